"""Exact resume with ConAdv state, crash-safe checkpoints under a real SIGKILL, no hang when a
rank fails, abort on non-finite losses, fp16 steps the loss scaler skips (2 CPU ranks)."""

import time

import pytest
import torch

from tests.common import WORLD
from tests.distributed import launch


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    launch("resume_worker.py", "--out", str(d / "r.pt"), "--ckpt", str(d / "ckpt"))
    results = [torch.load(d / f"r.pt.rank{r}", weights_only=False) for r in range(WORLD)]
    one_rank = launch("resume_worker.py", "--ckpt", str(d / "ckpt"), "--try_load", nproc=1)
    return results + [one_rank.stdout]


@pytest.mark.parametrize("case", ["lookahead/z2", "snapshot2/z2", "lookahead/z3", "snapshot2/z3"])
def test_resume_is_bit_identical(resumed, case):
    for rank in range(WORLD):
        assert resumed[rank][case]["equal"], resumed[rank][case]
        assert resumed[rank][case]["step"] == 6
        straight, resumed_sha, halfway = resumed[rank][case]["sha"]
        assert straight == resumed_sha != halfway and len(straight) == 64
        assert resumed[0][case]["sha"] == resumed[1][case]["sha"]  # the same fingerprint on every rank


@pytest.mark.parametrize("stage", [2, 3])
def test_a_tampered_or_truncated_checkpoint_file_is_refused_and_runs_nothing(resumed, stage):
    """Each kind of file in a checkpoint folder (ours per rank, DeepSpeed's model states, optimizer
    states) replaced by a pickle that would run a command, or cut in half: every rank stops with one
    line naming the file, and the command never ran. (The untouched checkpoint resumes bit-exactly:
    test_resume_is_bit_identical.)"""
    for rank in range(WORLD):
        cases = resumed[rank][f"tampered/z{stage}"]
        assert set(cases) == {"ours", "model", "optimizer", "truncated"}
        for kind, case in cases.items():
            assert case["error"] is not None and "\n" not in case["error"], (kind, case)
            assert case["file"] in case["error"] and "not a checkpoint file that loads safely" in case["error"]
            assert not case["ran"], (kind, case)


def test_resume_without_conadv_state_would_differ(resumed):
    """Control: the ConAdv state in the checkpoint is what makes the resume exact."""
    for rank in range(WORLD):
        assert not resumed[rank]["lookahead/z2/without_state"]["equal"]


def test_loading_another_run_is_one_line_naming_both_values(resumed):
    """Saved with τ = 2 on 2 ranks: loading with τ = 1 (a `KeyError: 'pending'` deep inside the
    schedule before), with schedule 'disadv', or on 1 rank names the field and both values."""
    for rank in range(WORLD):
        tau = resumed[rank]["load_tau1_from_tau2"]
        assert "saved with conadv.staleness=2 but this run has 1" in tau and "\n" not in tau
        disadv = resumed[rank]["load_disadv_from_tau2"]
        assert "saved with conadv.schedule='conadv', conadv.staleness=2 but this run has 'disadv', 0" in disadv
    assert "load error: " in resumed[WORLD] and "saved with world size=2 but this run has 1" in resumed[WORLD]


def test_nonfinite_loss_aborts_with_a_clear_message(resumed):
    for rank in range(WORLD):
        r = resumed[rank]["nonfinite"]
        assert r["steps"] == 1
        assert "loss is nan for 2 consecutive steps" in r["message"] and "max_nonfinite_steps=2" in r["message"]


def test_fp16_steps_the_loss_scaler_skips_neither_reuse_nor_lose_a_delta(resumed):
    """ZeRO-2 fp16, lookahead ConAdv, gradient accumulation 2: DeepSpeed skips the steps whose
    scaled gradients overflow, yet each still advances global_steps, which keys the δ: every
    (step, micro-batch) is attacked once, and the micro-batches are trained in stream order, each
    at its own step with the δ computed for it."""
    for rank in range(WORLD):
        r = resumed[rank]["fp16"]
        steps = r["steps"]
        assert steps == 12 and 0 < r["skipped"] < steps, r["skipped"]
        assert r["attacked"] == [(s, m) for s in range(steps + 1) for m in range(2)]  # the last: step 12's, ahead
        assert len(r["trained"]) == 2 * steps
        for j, (step, pixels, key) in enumerate(r["trained"]):
            assert step == j // 2 and key == [(j // 2, j % 2)], (rank, j, step, key)
            assert pixels == pytest.approx(r["stream"][j], rel=1e-4), (rank, j)


KILL_POINTS = ["deepspeed", "conadv_state", "publish", "latest", "same_tag"]


def incomplete(path):
    """A file with bytes that does not load: cut while it was written."""
    try:
        torch.load(path, weights_only=False)
    except Exception:  # a truncated zip archive: RuntimeError or OSError
        return path.stat().st_size > 0
    return False


def what_the_kill_left(d, kill_in):
    """Where each kill came, from what it left (before the next load repairs the folder)."""
    new = d / "global_step3.partial"
    if kill_in == "deepspeed":  # half of DeepSpeed's model-states file written
        assert incomplete(new / "mp_rank_00_model_states.pt")
    if kill_in == "conadv_state":  # half of rank 0's own state written to its temporary name
        cut = list(new.glob(".conadv_rank0.pt.tmp*"))
        assert len(cut) == 1 and incomplete(cut[0]) and not (new / "conadv_rank0.pt").exists()
    if kill_in == "publish":  # the new checkpoint complete but not yet moved into place
        assert (new / "conadv_run.json").is_file() and not (d / "global_step3").exists()
    if kill_in == "same_tag":  # between moving the old folder aside and moving the new one in
        assert (d / "kept.old").is_dir() and (d / "kept.partial").is_dir() and not (d / "kept").exists()
    if kill_in == "latest":  # the new checkpoint published, its name written beside `latest`, not yet over it
        assert (d / "global_step3").is_dir() and (d / "latest").read_text() == "global_step2"
        assert [f.read_text() for f in d.glob(".latest.tmp*")] == ["global_step3"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Per kill point: the dying run, its folder; then one launch verifies every folder."""
    runs = {}
    for kill_in in KILL_POINTS:
        d = tmp_path_factory.mktemp(f"kill_{kill_in}")
        runs[kill_in] = (launch("kill_worker.py", "--ckpt", str(d), "--kill_in", kill_in, check=False), d)
        what_the_kill_left(d, kill_in)
    launch("kill_worker.py", "--verify", *[str(d) for _, d in runs.values()])
    return runs


@pytest.mark.parametrize("kill_in", KILL_POINTS)
def test_kill_during_save_keeps_previous_checkpoint(killed, kill_in):
    died, d = killed[kill_in]
    assert died.returncode != 0 and "second save completed" not in died.stdout
    tag = "kept" if kill_in == "same_tag" else "global_step2"
    assert (d / "latest").read_text() == tag
    verdicts = [(d / f"verdict_rank{r}.txt").read_text() for r in range(WORLD)]
    assert verdicts == [f"verified checkpoint {tag}"] * WORLD, (verdicts, died.stdout[-2000:], died.stderr[-3000:])
    assert not list(d.glob("*.old")) and not list(d.glob("*.partial"))  # the load recovered the folder


def test_one_rank_failing_ends_the_run_quickly():
    start = time.monotonic()
    proc = launch("rank_failure_worker.py", check=False, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 60, f"run took {elapsed:.0f} s to end after a rank failed"
    out = proc.stdout + proc.stderr
    assert "simulated failure on rank 1" in out
    assert "rank      : 1" in out  # the launcher names the rank that failed first
