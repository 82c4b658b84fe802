"""The GPU scripts on a machine without CUDA, and the logic of the GPU benchmark that a CPU can check:
scripts/gpu_check.sh and benchmarks/gpu_throughput.py refuse in one line (exit 2) and gpu_check
installs nothing; the synchronisation counter, the timing loop, the plain bf16 loop and the
ratios of the table; the wheelhouse's list of packages."""

import os
import stat
import subprocess
import sys
from importlib import metadata

import torch
from torch import nn

from tests.distributed import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_throughput as gt  # noqa: E402

NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_gpu_check_without_cuda_exits_2_in_one_line_and_installs_nothing(tmp_path):
    """Every `python` the script runs goes through a recorder: the only one is the device count."""
    calls = tmp_path / "python_calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "python"
    recorder.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {sys.executable} "$@"\n')
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = {**NO_CUDA, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--wheels", str(wheels)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "needs a CUDA GPU" in proc.stderr, proc.stderr
    ran = calls.read_text().splitlines()
    assert len(ran) == 1 and "torch.cuda.device_count()" in ran[0], ran


def test_gpu_throughput_without_cuda_exits_2_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py")], capture_output=True,
                          text=True, env=NO_CUDA, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "needs a CUDA GPU" in proc.stderr, proc.stderr


def test_measure_counts_the_timed_steps_only():
    x = torch.ones(2)
    calls = []

    def step():
        calls.append(1)
        return x.cpu()

    rate, syncs = gt.measure(step, torch.device("cpu"), warmup=3, steps=4, units_per_step=10)
    assert len(calls) == 7 and syncs == {"Tensor.cpu": 1.0}
    assert rate > 0


def test_plain_step_trains_bf16_weights_through_fp32_masters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    batches = gt.image_batches(micro=4, size=8, classes=5, device=torch.device("cpu"))
    step, _ = gt.plain_step(lambda: net, batches, torch.device("cpu"), lr=0.1)  # casts `net` in place
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(3):
        assert torch.isfinite(step())
    after = list(net.parameters())
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


def test_ratios_come_from_the_measured_rows():
    rows = [gt.Row(gt.VISION, gt.CLEAN, "images/s", 1000.0, 3.0, 10.0),
            gt.Row(gt.VISION, gt.PLAIN, "images/s", 1250.0, 0.0, 9.0),
            gt.Row(gt.VISION, gt.DISADV, "images/s", 350.0, 3.0, 12.0),
            gt.Row(gt.VISION, gt.CONADV, "images/s", 400.0, 3.0, 12.5),
            gt.Row(gt.VISION, gt.SNAPSHOT, "images/s", 390.0, 3.0, 13.0),
            gt.Row(gt.BERT, gt.CLEAN, "tokens/s", 5000.0, 3.0, 4.0),
            gt.Row(gt.BERT, gt.CONADV, "tokens/s", 1500.0, 3.0, 5.0),
            gt.Row(gt.VISION, gt.CONADV + gt.COMPILED, "images/s", note="n/a: RuntimeError: no")]
    assert gt.ratio_line(rows) == "conadv/clean=0.400 disadv/clean=0.350"
    cells = [c.strip() for c in gt.format_row(rows[6], rows).split("|")]
    assert cells[3:7] == ["1,500 tokens/s", "0.300", "3", "5.00"]  # against BERT's clean row
    assert gt.format_row(rows[1], rows).split("|")[4].strip() == "1.250"
    assert "n/a: RuntimeError: no" in gt.format_row(rows[7], rows)


def test_wheelhouse_lists_what_the_project_needs_beyond_the_gpu_machines_own(tmp_path):
    out = tmp_path / "wheels"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "wheelhouse.sh"), str(out), "--python-version", "3.12",
                           "--dry-run"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split()
    names = {line.split("==")[0] for line in listed}
    assert f"deepspeed=={metadata.version('deepspeed')}" in listed
    assert {"pydantic", "hjson", "ninja", "py-cpuinfo", "msgpack", "psutil", "datasets", "pyarrow", "setuptools",
            "wheel"} <= names, names
    own = {"torch", "torchvision", "transformers", "accelerate", "timm", "triton"}
    assert not names & own and not any(n.startswith("nvidia-") for n in names), names
    assert not out.exists()
