"""The text studies' quick grids on the embedded help topics: the masked-LM large-batch study on 2 CPU
ranks (a row for every cell and seed, the gap closed recomputed from the CSV, a rerun that trains
nothing, other settings refused), then pretrain → fine-tune from the model it saved, both trainers."""

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest

from tests.distributed import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bert_large_batch  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def run(script, *args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=600, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("bert_study")
    return out, run("bert_large_batch.py", "--output_dir", str(out))


def test_masked_lm_study_rows_report_and_rerun(study):
    out, first = study
    grid = bert_large_batch.build_grid(bert_large_batch.parse_args(["--quick"]))
    assert {(m, b) for m, b, _, _ in grid} == {("lamb", 8), ("lamb", 32), ("disadv", 32), ("conadv", 32)}
    rows = rows_of(out / "results.csv")
    assert [(r["method"], int(r["batch"]), r["eps"], int(r["seed"])) for r in rows] == grid
    for r in rows:
        assert int(r["steps"]) == round(float(r["epochs"]) * (int(r["train_blocks"]) // int(r["batch"])))
        for k in ("heldout_acc", "train_acc"):
            assert 0.0 <= float(r[k]) <= 1.0
        assert float(r["heldout_loss"]) > 0 and float(r["seconds"]) > 0
    baseline = json.loads((out / "study.json").read_text())["baseline"]
    assert 0 < baseline["heldout_acc"] < 1 and baseline["heldout_masked_positions"] > 0

    # the share of LAMB's gap closed, recomputed from the CSV alone
    acc = {}
    for r in rows:
        acc.setdefault((r["method"], int(r["batch"]), r["eps"]), {})[int(r["seed"])] = float(r["heldout_acc"])
    gap = statistics.mean(acc[("lamb", 8, "0")].values()) - statistics.mean(acc[("lamb", 32, "0")].values())
    summary = json.loads((out / "summary.json").read_text())
    closed = {(c["method"], c["eps"]): c for c in summary["closed"]}
    assert set(closed) == {(m, e) for m, b, e in acc if b == 32 and m != "lamb"}
    for (m, e), c in closed.items():
        if gap == 0:
            continue
        fr = [(acc[(m, 32, e)][s] - acc[("lamb", 32, "0")][s]) / gap for s in (0, 1)]
        assert c["reference_gap"] == pytest.approx(gap)
        assert c["fraction"] == pytest.approx([statistics.mean(fr), statistics.stdev(fr)])
    assert (out / "accuracy_vs_batch.png").stat().st_size > 5000
    assert (out / "models" / "lamb_b8" / "config.json").is_file() and (out / "models" / "lamb_b8" / "tokenizer.json").is_file()

    again = run("bert_large_batch.py", "--output_dir", str(out))  # every cell is there: nothing retrained
    assert '{"method"' not in again.stdout and rows_of(out / "results.csv") == rows
    bad = run("bert_large_batch.py", "--output_dir", str(out), "--dropout", "0.2", check=False)
    assert bad.returncode != 0 and "other settings" in bad.stderr


def test_finetune_from_the_study_model_both_trainers(study, tmp_path):
    out, _ = study
    proc = run("finetune_text.py", "--output_dir", str(tmp_path), "--study_model", str(out / "models" / "lamb_b8"))
    rows = rows_of(tmp_path / "results.csv")
    assert sorted((r["model"], r["method"], int(r["seed"])) for r in rows) == [
        ("study", m, s) for m in ("conadv", "trainer") for s in (0, 1)]
    for r in rows:
        for k in ("accuracy", "robust_lo", "robust_hi"):
            assert 0.0 <= float(r[k]) <= 1.0
    med = statistics.median(float(r["accuracy"]) for r in rows if r["method"] == "conadv")
    assert f"{100 * med:.1f}" in (tmp_path / "results.md").read_text() and "conadv" in proc.stdout
    assert (tmp_path / "finetune.png").stat().st_size > 5000
