"""Bad input through the command line: exit code 2, one line naming the problem, no traceback."""

import json
import subprocess
import sys

import pytest

from conadv_ds.cli import validate_main
from tests.test_config import BAD, BASE

FILE_CASES = [
    ("missing.json", None, "config file '{d}/missing.json': not found"),
    ("truncated.json", '{"train_batch_size": 8, "conadv": {"epsilon": 0.1', "invalid JSON at line 1"),
    ("trailing_comma.json", '{"train_batch_size": 8,}', "invalid JSON at line 1"),
    ("empty.json", "", "invalid JSON at line 1 column 1"),
    ("list.json", "[]", "top level must be a JSON object, got list"),
    ("string.json", '"conadv"', "top level must be a JSON object, got str"),
]


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        validate_main(argv)
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize("patch,world,expected", BAD)
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, patch, world, expected):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, **patch}))
    code, err = run([str(path), "--world_size", str(world)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name,text,expected", FILE_CASES)
def test_bad_file_exits_2_with_one_line(tmp_path, capsys, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    code, err = run([str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and expected.format(d=tmp_path) in err


def test_world_size_must_be_positive(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(BASE))
    code, err = run([str(path), "--world_size", "0"], capsys)
    assert code == 2 and "--world_size=0: must be >= 1" in err


def test_good_config_prints_the_resolved_plan(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "conadv": {"staleness": 2}}))
    validate_main([str(path), "--world_size", "2"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["gradient_accumulation_steps"] == 2 and plan["micro_batch_per_rank"] == 8
    assert plan["conadv"]["staleness"] == 2 and plan["optimizer"] == "SGD"


def test_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "conadv": {"stepsize": 1}}))
    proc = subprocess.run([sys.executable, "-m", "conadv_ds.cli", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: conadv.stepsize: unknown key (did you mean 'step_size'?); allowed: "
                                   + ", ".join(__import__("conadv_ds").ConAdvConfig.model_fields))


ENDING = """
import os, sys
import torch.distributed as dist
from conadv_ds.cli import run_launched
from tests.distributed import free_port

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")

def main():
    dist.init_process_group("gloo")
    dist.all_reduce(__import__("torch").ones(1))
    if sys.argv[1] == "fail":
        raise RuntimeError("a rank failed")

try:
    run_launched(main)
finally:
    print("initialized after main:", dist.is_initialized())
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_a_finished_run_destroys_its_process_groups(outcome):
    """After `main` returns the process groups are destroyed (gloo's threads left to interpreter
    exit can abort the process); after an exception they are left alone (destroying would wait
    for ranks that may be gone)."""
    from tests.distributed import ROOT

    proc = subprocess.run([sys.executable, "-c", ENDING, outcome], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert f"initialized after main: {outcome == 'fail'}" in proc.stdout, proc.stderr[-2000:]
    assert (proc.returncode == 0) == (outcome == "ok")
