"""Schedule 'split': attacker ranks compute δ while trainer ranks update.

The reference is the in-process ConAdv schedule with the same τ and seeds (itself checked
against hand-written PyTorch loops in test_engine_distributed): split must reproduce its δ for
every micro-batch and its final weights bit for bit, on 1 trainer + 1 attacker and on
2 trainers + 1 attacker, under ZeRO 0, 2 and 3.
"""

from __future__ import annotations

import pytest
import torch

from conadv_ds.errors import ConfigError
from conadv_ds.resolve import resolve_config
from tests.common import DETERMINISTIC, ds_config
from tests.distributed import launch


def _load(out, rank: int) -> dict:
    return torch.load(f"{out}.rank{rank}", weights_only=False)


def _assert_same_as_inprocess(trainer: dict, cases: list[str], trainer_world: int, trainer_rank: int) -> None:
    for name in cases:
        s, ref = trainer[f"split/{name}"], trainer[f"inproc/{name}"]
        assert s["world"] == trainer_world and s["rank"] == trainer_rank, name
        assert sorted(s["deltas"]) == sorted(ref["deltas"]) and len(ref["deltas"]) > 0, name
        for key, d in ref["deltas"].items():
            assert torch.equal(s["deltas"][key], d), f"{name}: δ of (step, micro) {key} differs"
        assert any(d.abs().sum() > 0 for d in ref["deltas"].values()), name
        for a, b in zip(s["params"], ref["params"]):
            assert torch.equal(a, b), f"{name}: final weights differ from in-process ConAdv"
        assert [m["loss"] for m in s["metrics"]] == [m["loss"] for m in ref["metrics"]], name


def test_one_trainer_one_attacker_listed_first(tmp_path):
    """attacker_ranks=[0]: launch rank 0 attacks, launch rank 1 is the whole ZeRO world. Also:
    2 steps + save + fresh engines on both ranks + load + 2 steps = 4 steps straight, bit for bit."""
    cases = ["z2/tau1", "z0/tau2"]
    launch("split_worker.py", "--out", str(tmp_path / "r"), "--attackers", "[0]", "--cases", *cases,
           "--resume_dir", str(tmp_path / "ckpt"), timeout=900)
    attacker, trainer = _load(tmp_path / "r", 0), _load(tmp_path / "r", 1)
    _assert_same_as_inprocess(trainer, cases, trainer_world=1, trainer_rank=0)
    for name in cases:
        served = attacker[f"split/{name}"]
        assert [m["step"] for m in served["metrics"]] == [m["step"] for m in trainer[f"split/{name}"]["metrics"]]
        assert served["stale_bytes"] >= sum(p.numel() * 4 for p in trainer[f"split/{name}"]["params"])
    assert "inproc/z2/tau1" not in attacker
    for a, b in zip(trainer["resume"]["params"], trainer["split/z2/tau1"]["params"]):
        assert torch.equal(a, b), "split: resumed run differs from the straight run"


def test_two_trainers_one_attacker_zero3(tmp_path):
    cases = ["z3/tau2/gas2"]
    launch("split_worker.py", "--out", str(tmp_path / "r"), "--attackers", "1", "--cases", *cases, nproc=3,
           timeout=900)
    for rank in (0, 1):
        _assert_same_as_inprocess(_load(tmp_path / "r", rank), cases, trainer_world=2, trainer_rank=rank)
    trainers = [_load(tmp_path / "r", r)["split/z3/tau2/gas2"] for r in (0, 1)]
    for a, b in zip(trainers[0]["params"], trainers[1]["params"]):
        assert torch.equal(a, b)
    assert not torch.equal(trainers[0]["deltas"][(0, 0)], trainers[1]["deltas"][(0, 0)])  # per-rank data and seeds


LAYOUT_ERRORS = [
    # (attacker_ranks, launch world size, ZeRO stage, message fragment)
    (1, 1, 2, "needs at least 2 ranks (trainers + attackers), launched with world size 1"),
    (2, 2, 2, "conadv.attacker_ranks=2: leaves no trainer rank in world size 2; allowed: 1..1"),
    (0, 2, 2, "conadv.attacker_ranks=0: must be >= 1"),
    ([], 2, 2, "conadv.attacker_ranks=[]: must name at least one rank"),
    ([2], 2, 2, "conadv.attacker_ranks=[2]: rank 2 out of range for world size 2; allowed: 0..1"),
    ([0, 0], 3, 2, "conadv.attacker_ranks=[0, 0]: rank 0 listed twice"),
    ([0, 1], 2, 2, "conadv.attacker_ranks=[0, 1]: leaves no trainer rank in world size 2"),
    (2, 3, 2, "conadv.attacker_ranks=2: 2 attackers for 1 trainers; allowed: at most one attacker per trainer"),
]


@pytest.mark.parametrize("attackers,size,stage,message", LAYOUT_ERRORS)
def test_impossible_layouts(monkeypatch, attackers, size, stage, message):
    monkeypatch.setenv("WORLD_SIZE", str(size))
    cfg = ds_config(stage, 1, {**DETERMINISTIC, "schedule": "split", "attacker_ranks": attackers})
    cfg.pop("train_batch_size", None)
    with pytest.raises(ConfigError) as err:
        resolve_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batch_arithmetic_counts_trainers_only(monkeypatch):
    """train_batch_size = micro × gas × *trainer* ranks: 8 × 1 × 2 fits 3 launch ranks with 1 attacker."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    ok = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
          "conadv": {"schedule": "split", "attacker_ranks": 1}}
    assert resolve_config(ok).layout.trainers == (0, 1)
    bad = {**ok, "train_batch_size": 24}
    with pytest.raises(ConfigError, match=r"train_batch_size=24.*world size is the 2 trainer ranks of 3"):
        resolve_config(bad)


def test_zero3_hpz_must_divide_trainers(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2},
           "conadv": {"schedule": "split", "attacker_ranks": 1}}
    with pytest.raises(ConfigError, match=r"zero_hpz_partition_size=2: must divide the 3 trainer ranks"):
        resolve_config(cfg)


def test_not_split_means_no_layout(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_config(ds_config(2, 1, DETERMINISTIC)).layout is None


def test_validate_counts_trainers(tmp_path):
    from conadv_ds.cli import validate

    cfg = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8,
           "conadv": {"schedule": "split", "attacker_ranks": [0]}}
    summary = validate(cfg, 3)
    assert summary["world_size"] == 2 and summary["attacker_ranks"] == [0] and summary["launched_ranks"] == 3
    assert summary["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match="leaves no trainer rank in world size 1|needs at least 2 ranks"):
        validate(cfg, 1)
