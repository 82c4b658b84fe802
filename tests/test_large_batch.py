"""The large-batch study's quick grid on 2 CPU ranks: every cell trained and evaluated, the
table and plot written, and a second run resumes instead of retraining."""

import csv
import os
import subprocess
import sys

from tests.distributed import ROOT

SCRIPT = ROOT / "benchmarks" / "large_batch.py"


def run(out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_quick_grid_and_resume(tmp_path):
    first = run(tmp_path)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["batch"]) for r in rows} == {(m, b) for m in ("lars", "disadv", "conadv", "conadv+aa")
                                                       for b in ("64", "256")}
    small = {r["method"]: float(r["test_top1"]) for r in rows if r["batch"] == "64"}
    assert all(0.2 < acc <= 1.0 for acc in small.values())  # learned something from chance (0.1)
    assert "closes" in first.stdout and (tmp_path / "accuracy_vs_batch.png").stat().st_size > 5000
    assert (tmp_path / "results.md").read_text().startswith("| batch | lars | disadv | conadv | conadv+aa |")
    second = run(tmp_path)
    assert '"method"' not in second.stdout  # nothing retrained
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
