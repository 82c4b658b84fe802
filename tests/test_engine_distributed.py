"""2 CPU ranks: ConAdvEngine against raw DeepSpeed and against plain-PyTorch reference loops,
under ZeRO 0-3, for clean, DisAdv and ConAdv (lookahead and sharded snapshots)."""

import pytest
import torch

from tests.common import WORLD, digits_batches, reference_train
from tests.distributed import launch

STEPS = 4
STAGES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("core") / "results.pt"
    launch("core_worker.py", "--out", str(out))
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def refs():
    steps, steps_gas2 = digits_batches(STEPS), digits_batches(STEPS, gas=2)
    deltas = {name: [] for name in ("disadv", "tau1", "tau2", "tau1_gas2")}
    return {
        "clean": reference_train(steps, "clean"),
        "clean_gas2": reference_train(steps_gas2, "clean"),
        "disadv": reference_train(steps, "adv", tau=0, record=deltas["disadv"]),
        "tau1": reference_train(steps, "adv", tau=1, record=deltas["tau1"]),
        "tau2": reference_train(steps, "adv", tau=2, record=deltas["tau2"]),
        "tau1_gas2": reference_train(steps_gas2, "adv", tau=1, record=deltas["tau1_gas2"]),
        "deltas": deltas,
    }


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_references_are_distinguishable(refs):
    """The staleness tests below could not fail if the schedules gave the same weights."""
    for a, b in [("clean", "disadv"), ("disadv", "tau1"), ("tau1", "tau2")]:
        assert max_diff(refs[a], refs[b]) > 1e-4, (a, b)


@pytest.mark.parametrize("stage", STAGES)
def test_disabled_follows_raw_deepspeed_exactly(runs, refs, stage):
    raw = runs[0][f"raw/z{stage}"]["params"]
    for name in ("off", "noblock"):
        ours = runs[0][f"{name}/z{stage}"]["params"]
        assert all(torch.equal(a, b) for a, b in zip(raw, ours)), name
    assert max_diff(raw, refs["clean"]) < 1e-5


def test_disabled_with_accumulation(runs, refs):
    assert max_diff(runs[0]["raw/z0/gas2"]["params"], refs["clean_gas2"]) < 1e-5
    assert max_diff(runs[0]["off/z3/gas2"]["params"], refs["clean_gas2"]) < 1e-5


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case,ref", [("disadv", "disadv"), ("lookahead1", "tau1"), ("snapshot1", "tau1"),
                                      ("snapshot2", "tau2")])
def test_schedule_matches_plain_pytorch(runs, refs, stage, case, ref):
    assert max_diff(runs[0][f"{case}/z{stage}"]["params"], refs[ref]) < 1e-5


@pytest.mark.parametrize("case,ref", [("snapshot2/z3/persist0", "tau2"), ("lookahead1/z2/gas2", "tau1_gas2"),
                                      ("snapshot1/z3/gas2", "tau1_gas2")])
def test_zero_variants_match_plain_pytorch(runs, refs, case, ref):
    assert max_diff(runs[0][case]["params"], refs[ref]) < 1e-5


@pytest.mark.parametrize("case,ref", [("disadv/z0", "disadv"), ("lookahead1/z3", "tau1"), ("snapshot1/z2", "tau1"),
                                      ("snapshot2/z3", "tau2"), ("lookahead1/z2/gas2", "tau1_gas2")])
def test_each_rank_uses_the_reference_delta(runs, refs, case, ref):
    """δ of every (step, micro-batch, rank) equals PGD against the explicitly kept old weights."""
    for rank in range(WORLD):
        ours = runs[rank][case]["deltas"]
        for step, ref_step in enumerate(refs["deltas"][ref]):
            for (micro, r), d in ref_step.items():
                if r == rank:
                    assert torch.allclose(ours[step, micro], d, atol=1e-6), (case, step, micro, rank)


@pytest.mark.parametrize("stage", STAGES)
def test_lookahead_equals_snapshot(runs, stage):
    for rank in range(WORLD):
        la, sn = runs[rank][f"lookahead1/z{stage}"], runs[rank][f"snapshot1/z{stage}"]
        assert la["deltas"].keys() == sn["deltas"].keys()
        assert all(torch.equal(la["deltas"][k], sn["deltas"][k]) for k in la["deltas"])
        assert all(torch.equal(a, b) for a, b in zip(la["params"], sn["params"]))


@pytest.mark.parametrize("stage", STAGES)
def test_schedule_memory_is_what_is_measured(runs, stage):
    """Every tensor a schedule holds is counted: the accounting equals the bytes found by walking
    the schedule's object graph (beyond what DeepSpeed's engine holds). Lookahead holds the next
    step's batches and their δ; a snapshot is this rank's shard (the full model at ZeRO-0) plus
    the replicated buffers."""
    for rank in range(WORLD):
        for case in ("disadv", "lookahead1", "snapshot1", "snapshot2"):
            mem = runs[rank][f"{case}/z{stage}"]["memory"]
            assert mem["accounted"] == mem["measured"], (case, mem)
        assert runs[rank][f"disadv/z{stage}"]["memory"]["measured"] == 0
        lookahead = runs[rank][f"lookahead1/z{stage}"]["memory"]
        assert lookahead["measured"] == lookahead["one_step_with_delta"] > 0
        model = runs[rank][f"snapshot1/z{stage}"]["model_bytes"]
        per_copy = model if stage == 0 else 1.05 * model / WORLD
        buffers = 4 * 1024  # SmallCNN's BatchNorm statistics, well under this
        assert 0 < runs[rank][f"snapshot1/z{stage}"]["memory"]["measured"] <= per_copy + buffers
        assert runs[rank][f"snapshot2/z{stage}"]["memory"]["measured"] <= 2 * (per_copy + buffers)


@pytest.mark.parametrize("stage", (0, 2))
@pytest.mark.parametrize("aux", (0, 1))
def test_lookahead_equals_snapshot_with_running_statistics(runs, stage, aux):
    """attack_bn 'eval': the attack reads BatchNorm running statistics, which a snapshot keeps
    with the weights; lookahead and snapshot then give the same δ and the same weights."""
    for rank in range(WORLD):
        la = runs[rank][f"evalbn/aux{aux}/lookahead/z{stage}"]
        sn = runs[rank][f"evalbn/aux{aux}/snapshot/z{stage}"]
        assert la["deltas"].keys() == sn["deltas"].keys() and len(la["deltas"]) == STEPS
        assert all(torch.equal(la["deltas"][k], sn["deltas"][k]) for k in la["deltas"])
        assert all(torch.equal(a, b) for a, b in zip(la["params"], sn["params"]))
    # controls: the running statistics matter (eval-mode δ differs from train-mode δ, and from the
    # eval-mode δ through shared BatchNorm when the adversarial branch has its own statistics)
    other = runs[0][f"lookahead1/z{stage}"] if aux == 0 else runs[0][f"evalbn/aux0/lookahead/z{stage}"]
    ours = runs[0][f"evalbn/aux{aux}/lookahead/z{stage}"]
    assert max((ours["deltas"][k] - other["deltas"][k]).abs().max().item() for k in ours["deltas"]) > 1e-6


@pytest.mark.parametrize("stage", (0, 1))
def test_attack_leaves_parameter_grads_alone(runs, stage):
    assert all(runs[r][f"grads_untouched/z{stage}"] for r in range(WORLD))


def test_metrics_reported(runs):
    """Loss parts are consistent: loss = (1-λ)·clean + λ·adv with λ = 0.5, averaged over ranks."""
    for case in ("disadv/z2", "lookahead1/z3"):
        for rank in range(WORLD):
            for m in runs[rank][case]["metrics"]:
                assert m["loss"] == pytest.approx(0.5 * m["clean_loss"] + 0.5 * m["adv_loss"], rel=1e-5)
                assert m["adv_loss"] > m["clean_loss"]
                assert 0 <= m["adv_accuracy"] <= m["accuracy"] + 0.25
                assert m["lr"] == pytest.approx(0.05) and m["samples_per_sec"] > 0
        assert runs[0][case]["metrics"][-1]["loss"] == runs[1][case]["metrics"][-1]["loss"]
    assert "adv_loss" not in runs[0]["off/z0"]["metrics"][0]


@pytest.mark.parametrize("lookahead,snapshot", [
    *[(f"lookahead1/z{s}/bf16", f"snapshot1/z{s}/bf16") for s in (0, 2, 3)],
    *[(f"bert/lookahead/z{s}", f"bert/snapshot/z{s}") for s in (0, 2, 3)],
    *[(f"auxbn/lookahead/z{s}", f"auxbn/snapshot/z{s}") for s in (0, 3)],
])
def test_lookahead_equals_snapshot_in_bf16_text_and_aux_bn(runs, lookahead, snapshot):
    """Same trajectory from both stale-weight mechanisms, in bf16, for a BERT with dropout
    (the attack must not shift the dropout stream) and with auxiliary BatchNorm."""
    la, sn = runs[0][lookahead]["params"], runs[0][snapshot]["params"]
    assert all(torch.equal(a, b) for a, b in zip(la, sn))


@pytest.mark.parametrize("family", ["bf16", "bert"])
def test_sharded_stages_follow_zero0(runs, family):
    tol = {"bf16": 2e-2, "bert": 1e-5}[family]
    for stage in (2, 3):
        name = "lookahead1/z{}/bf16" if family == "bf16" else "bert/lookahead/z{}"
        assert max_diff(runs[0][name.format(stage)]["params"], runs[0][name.format(0)]["params"]) < tol


def test_aux_bn_changes_training(runs):
    """The auxiliary branch is really used: its trajectory differs from shared BatchNorm."""
    assert max_diff(runs[0]["auxbn/lookahead/z0"]["params"][:4], runs[0]["lookahead1/z0"]["params"][:4]) > 1e-6


def test_bert_reports_adversarial_mlm_loss(runs):
    for m in runs[0]["bert/lookahead/z3"]["metrics"]:
        assert m["adv_loss"] > m["clean_loss"] > 0
