"""The large-batch study's quick grid on 2 CPU ranks: a row for every cell and seed, the report
recomputed independently from the CSV, and a rerun that retrains only the cells it dropped."""

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest

from tests.distributed import ROOT

SCRIPT = ROOT / "benchmarks" / "large_batch.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import large_batch  # noqa: E402


def run(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output_dir", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def trained(proc):
    """The cells a run trained, from the JSON rows it prints."""
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"method"')]
    return [(r["method"], r["batch"], r["eps255"], r["seed"]) for r in rows]


def rows_of(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_grid_order_and_keys():
    grid = large_batch.build_grid(large_batch.parse_args(["--quick"]))
    methods = [c[0] for c in grid]
    first_aa = methods.index("conadv+aa")
    assert all(m == "conadv+aa" for m in methods[first_aa:])  # AA cells last
    assert len(set(grid)) == len(grid)
    # the small-batch reference runs LARS only; every method runs at the large batch
    assert {(m, b) for m, b, _, _ in grid} == {("lars", 64)} | {(m, 256) for m in large_batch.METHODS}
    assert {c for c in grid if c[0] == "conadv" and c[2] == "4"} == {("conadv", 256, "4", s) for s in (0, 1)}
    assert all(e == "0" for m, _, e, _ in grid if m in ("lars", "lars+ls"))


def test_quick_study_report_and_redo(tmp_path):
    first = run(tmp_path)
    grid = large_batch.build_grid(large_batch.parse_args(["--quick"]))
    rows = rows_of(tmp_path / "results.csv")
    keys = [(r["method"], int(r["batch"]), r["eps255"], int(r["seed"])) for r in rows]
    assert keys == grid  # every cell and seed, once, in grid order
    assert [tuple(c) for c in trained(first)] == grid
    for r in rows:
        assert int(r["steps"]) == round(float(r["epochs"]) * (int(r["train_size"]) // int(r["batch"])))
        assert 0.0 <= float(r["test_top1"]) <= 1.0 and 0.0 <= float(r["train_top1"]) <= 1.0
        assert float(r["seconds"]) > 0
    small_lars = [float(r["test_top1"]) for r in rows if r["method"] == "lars" and r["batch"] == "64"]
    assert statistics.fmean(small_lars) > 0.2  # learned something (chance is 0.1)

    # the report, recomputed here from the CSV alone
    summary = json.loads((tmp_path / "summary.json").read_text())
    val = {k: {} for k in ("test_top1", "train_top1", "seconds")}
    for r in rows:
        for k, per_cell in val.items():
            per_cell.setdefault((r["method"], int(r["batch"]), r["eps255"]), {})[int(r["seed"])] = float(r[k])
    assert len(summary["cells"]) == len(val["test_top1"])
    for c in summary["cells"]:
        cell = (c["method"], c["batch"], c["eps"])
        test, train = val["test_top1"][cell], val["train_top1"][cell]
        assert c["test"] == pytest.approx([statistics.mean(test.values()), statistics.stdev(test.values())])
        assert c["train"][0] == pytest.approx(statistics.mean(train.values()))
        assert c["gap"][0] == pytest.approx(statistics.mean(train[s] - test[s] for s in test))
        lars_secs = val["seconds"][("lars", c["batch"], "0")]
        assert c["cost_vs_reference"] == pytest.approx(
            statistics.mean(val["seconds"][cell][s] / lars_secs[s] for s in lars_secs))
    lars_small, lars_large = val["test_top1"][("lars", 64, "0")], val["test_top1"][("lars", 256, "0")]
    gap = statistics.mean(lars_small.values()) - statistics.mean(lars_large.values())
    closed = {(c["method"], c["eps"]): c for c in summary["closed"]}
    assert set(closed) == {(m, e) for m, b, e in val["test_top1"] if b == 256 and m != "lars"}
    for (m, e), c in closed.items():
        fr = [(val["test_top1"][(m, 256, e)][s] - lars_large[s]) / gap for s in (0, 1)]
        assert c["reference_gap"] == pytest.approx(gap)
        assert c["fraction"] == pytest.approx([statistics.mean(fr), statistics.stdev(fr)])
    md = (tmp_path / "results.md").read_text()
    assert f"{closed[('conadv', '8')]['fraction'][0]:.0%}" in md
    assert (tmp_path / "accuracy_vs_batch.png").stat().st_size > 5000

    # rerun: --redo drops the AA rows; only they are retrained, every other row is kept as it was
    second = run(tmp_path, "--redo", "conadv+aa")
    aa = [c for c in grid if c[0] == "conadv+aa"]
    assert [tuple(c) for c in trained(second)] == aa
    again = rows_of(tmp_path / "results.csv")
    assert [r for r in again if r["method"] != "conadv+aa"] == [r for r in rows if r["method"] != "conadv+aa"]
    assert sorted((r["method"], int(r["batch"]), r["eps255"], int(r["seed"])) for r in again) == sorted(grid)
    assert rows_of(tmp_path / "results.csv.bak") == rows
    # other training settings in the same folder are refused instead of mixed in
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output_dir", str(tmp_path), "--width", "4"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert bad.returncode != 0 and "other settings" in bad.stderr
