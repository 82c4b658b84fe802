"""2 CPU ranks: ConAdvEngine against raw DeepSpeed and against plain-PyTorch reference loops,
under ZeRO 0-3, for clean, DisAdv and ConAdv (lookahead and sharded snapshots), and for the
shipped attack (targeted, clean start 0.2, auxiliary BatchNorm, bf16, an LR schedule) against
`tests.reference_attack` fed with the random numbers the engine drew.

Every approximate comparison is bounded relative to what moved — weights to within REL of their
largest movement over the compared steps, δ to within REL·ε — and for each bound a control shows
that a real difference (the nearest wrong variant) exceeds it FAR times over."""

import contextlib

import pytest
import torch

from tests.common import DETERMINISTIC, EPS, MICRO, WORLD, digits_batches, make_model, reference_train
from tests.distributed import launch
from tests.reference_attack import (
    SCHEDULER,
    SHIPPED,
    SHIPPED_L2,
    Settings,
    attack_draws,
    reference_run,
    warmup_decay_lr,
)

STEPS = 4
STAGES = (0, 1, 2, 3)
REL = 1e-3
"""Runs that should agree differ by summation order only (bf16 included: the reference rounds
where DeepSpeed does); 1e-3 of the movement leaves room for that and nothing else."""
FAR = 10
"""How many bounds a control's difference must exceed."""
METRIC_REL = 1e-5
"""Relative bound on a reported loss against the reference's (fp32 sums of the same numbers)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("core") / "results.pt"
    launch("core_worker.py", "--out", str(out))
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(WORLD)]


@contextlib.contextmanager
def one_thread():
    """The references' tiny convolutions: on one thread they take a tenth of a second per run,
    on two threads of a loaded machine up to seconds (the threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def refs():
    steps, steps_gas2 = digits_batches(STEPS), digits_batches(STEPS, gas=2)
    deltas = {name: [] for name in ("disadv", "tau1", "tau2", "tau1_gas2")}
    with one_thread():
        return {
            "initial": [p.detach().clone() for p in make_model().parameters()],
            "clean": reference_train(steps, "clean"),
            "clean_gas2": reference_train(steps_gas2, "clean"),
            "clean_per_micro": reference_train([[mb] for step in steps_gas2 for mb in step], "clean"),
            "disadv": reference_train(steps, "adv", tau=0, record=deltas["disadv"]),
            "tau1": reference_train(steps, "adv", tau=1, record=deltas["tau1"]),
            "tau2": reference_train(steps, "adv", tau=2, record=deltas["tau2"]),
            "tau1_gas2": reference_train(steps_gas2, "adv", tau=1, record=deltas["tau1_gas2"]),
            "disadv_gas2": reference_train(steps_gas2, "adv", tau=0),
            "deltas": deltas,
        }


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def assert_follows(ours, ref, initial, what=""):
    """`ours` is within REL of the weights' movement (from `initial` to `ref`) of `ref`."""
    bound, diff = REL * max_diff(ref, initial), max_diff(ours, ref)
    assert diff <= bound, f"{what}: {diff:.3g} from the reference, more than {REL}·movement = {bound:.3g}"


def assert_departs(other, ours, initial, what=""):
    """Control: `other` (a wrong variant) is more than FAR bounds of `assert_follows` from `ours`."""
    bound, diff = REL * max_diff(ours, initial), max_diff(other, ours)
    assert diff > FAR * bound, f"{what}: only {diff:.3g} apart, not above {FAR}·{REL}·movement = {FAR * bound:.3g}"


def max_delta_diff(ours: dict, theirs: dict) -> float:
    """Largest |δ difference| over the keys both hold."""
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours.keys() & theirs.keys())


@pytest.mark.parametrize("wrong,right", [("disadv", "clean"), ("clean_per_micro", "clean_gas2"), ("tau1", "disadv"),
                                         ("disadv", "tau1"), ("tau2", "tau1"), ("tau1", "tau2"),
                                         ("disadv_gas2", "tau1_gas2")])
def test_nearest_wrong_schedule_departs_from_each_reference(refs, wrong, right):
    """The bounds below would catch the nearest wrong schedule: an attack where there is none, an
    optimizer step per micro-batch instead of accumulation, weights one step fresher or staler."""
    assert_departs(refs[wrong], refs[right], refs["initial"], f"{wrong} vs {right}")


@pytest.mark.parametrize("wrong,right,from_step", [("disadv", "tau1", 1), ("tau1", "tau2", 2)])
def test_delta_of_the_nearest_wrong_staleness_departs(refs, wrong, right, from_step):
    """The δ bound (REL·ε) would catch δ computed from weights one step off."""
    def flat(name):
        return {(t, m, r): d for t, step in enumerate(refs["deltas"][name]) if t >= from_step
                for (m, r), d in step.items()}

    assert max_delta_diff(flat(wrong), flat(right)) > FAR * REL * EPS


@pytest.mark.parametrize("stage", STAGES)
def test_disabled_follows_raw_deepspeed_exactly(runs, refs, stage):
    raw = runs[0][f"raw/z{stage}"]["params"]
    for name in ("off", "noblock"):
        ours = runs[0][f"{name}/z{stage}"]["params"]
        assert all(torch.equal(a, b) for a, b in zip(raw, ours)), name
    assert_follows(raw, refs["clean"], refs["initial"])


def test_disabled_with_accumulation(runs, refs):
    for case in ("raw/z0/gas2", "off/z3/gas2"):
        assert_follows(runs[0][case]["params"], refs["clean_gas2"], refs["initial"], case)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case,ref", [("disadv", "disadv"), ("lookahead1", "tau1"), ("snapshot1", "tau1"),
                                      ("snapshot2", "tau2")])
def test_schedule_matches_plain_pytorch(runs, refs, stage, case, ref):
    assert_follows(runs[0][f"{case}/z{stage}"]["params"], refs[ref], refs["initial"])


@pytest.mark.parametrize("case,ref", [("snapshot2/z3/persist0", "tau2"), ("lookahead1/z2/gas2", "tau1_gas2"),
                                      ("snapshot1/z3/gas2", "tau1_gas2")])
def test_zero_variants_match_plain_pytorch(runs, refs, case, ref):
    assert_follows(runs[0][case]["params"], refs[ref], refs["initial"])


@pytest.mark.parametrize("case,ref", [("disadv/z0", "disadv"), ("lookahead1/z3", "tau1"), ("snapshot1/z2", "tau1"),
                                      ("snapshot2/z3", "tau2"), ("lookahead1/z2/gas2", "tau1_gas2")])
def test_each_rank_uses_the_reference_delta(runs, refs, case, ref):
    """δ of every (step, micro-batch, rank) equals PGD against the explicitly kept old weights."""
    for rank in range(WORLD):
        ours = runs[rank][case]["deltas"]
        for step, ref_step in enumerate(refs["deltas"][ref]):
            for (micro, r), d in ref_step.items():
                if r == rank:
                    diff = (ours[step, micro] - d).abs().max().item()
                    assert diff <= REL * EPS, (case, step, micro, rank, diff)


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
    assert max_delta_diff(ours["deltas"], other["deltas"]) > FAR * REL * EPS


@pytest.mark.parametrize("stage", (0, 1))
def test_attack_leaves_parameter_grads_alone(runs, stage):
    assert all(runs[r][f"grads_untouched/z{stage}"] for r in range(WORLD))


@pytest.fixture(scope="module")
def deterministic_refs():
    """tests.reference_attack's loop on the deterministic attack of the cases above (no draws needed)."""
    det = Settings.of({**SHIPPED, **DETERMINISTIC, "aux_bn": False})
    steps = digits_batches(STEPS)
    with one_thread():
        return {"disadv/z2": reference_run(steps, det.but(staleness=0)), "lookahead1/z3": reference_run(steps, det)}


def test_new_reference_reduces_to_the_deterministic_one(refs, deterministic_refs):
    """tests.reference_attack, given the deterministic settings, is tests.common's reference: the
    shipped-attack reference below stands on the same loop that the schedule tests verify."""
    for case, ref in (("disadv/z2", "disadv"), ("lookahead1/z3", "tau1")):
        assert_follows(deterministic_refs[case].main_branch(), refs[ref], refs["initial"], case)


def assert_rank_means(metrics: list[dict], ranks: list[list[dict]]) -> None:
    """Each step's losses are the mean of the ranks' own (reference) values, which differ by far
    more than the bound, so that a sum or one rank's value would fail; accuracies pool all labels."""
    for t, m in enumerate(metrics):
        per = ranks[t]
        for key in ("loss", "clean_loss", "adv_loss"):
            values = [r[key] for r in per]
            mean = sum(values) / WORLD
            assert m[key] == pytest.approx(mean, rel=METRIC_REL), (t, key, values)
            assert abs(values[0] - values[1]) > FAR * METRIC_REL * abs(mean), (t, key, values)
        for key, correct in (("accuracy", "correct"), ("adv_accuracy", "adv_correct")):
            assert m[key] == pytest.approx(sum(r[correct] for r in per) / sum(r["counted"] for r in per)), (t, key)


@pytest.mark.parametrize("case", ["disadv/z2", "lookahead1/z3"])
def test_metrics_reported(runs, deterministic_refs, case):
    """loss = (1-λ)·clean + λ·adv with λ = 0.5, each the mean over ranks; every rank reports the same."""
    for rank in range(WORLD):
        metrics = runs[rank][case]["metrics"]
        for m in metrics:
            assert m["loss"] == pytest.approx(0.5 * m["clean_loss"] + 0.5 * m["adv_loss"], rel=METRIC_REL)
            assert m["adv_loss"] > m["clean_loss"]
            assert m["samples_per_sec"] > 0
        assert_rank_means(metrics, deterministic_refs[case].ranks)
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
    """ZeRO-2 and -3 stay within REL of ZeRO-0's movement; the same run with a 10% smaller ε leaves it."""
    name = "lookahead1/z{}/bf16" if family == "bf16" else "bert/lookahead/z{}"
    zero0 = runs[0][name.format(0)]
    for stage in (2, 3):
        assert_follows(runs[0][name.format(stage)]["params"], zero0["params"], zero0["initial"], f"ZeRO-{stage}")
    assert_departs(runs[0][name.format(0) + "/eps0.9"]["params"], zero0["params"], zero0["initial"], "ε·0.9")


def test_aux_bn_changes_training(runs):
    """The auxiliary branch is really used: the trajectory of the first convolution and BatchNorm
    (present in both models) leaves shared BatchNorm's by far more than the bound."""
    shared = runs[0]["lookahead1/z0"]
    assert_departs(runs[0]["auxbn/lookahead/z0"]["params"][:4], shared["params"][:4], shared["initial"][:4])


def test_bert_reports_adversarial_mlm_loss(runs):
    for m in runs[0]["bert/lookahead/z3"]["metrics"]:
        assert m["adv_loss"] > m["clean_loss"] > 0


# -- the shipped attack against tests.reference_attack ---------------------------------------------

SHIPPED_CASES = {"shipped/z2": (SHIPPED, False), "shipped/z3": (SHIPPED, False),
                 "shipped/l2/z3": ({**SHIPPED, **SHIPPED_L2}, False), "shipped/z2/bf16": (SHIPPED, True)}
SCHEDULE = warmup_decay_lr(**SCHEDULER["params"])
"""The configured LR schedule as a function of the scheduler's iteration (−1 before its first step)."""
NEAREST_WRONG = {"untargeted": {"targeted": False}, "no random starts": {"clean_start_prob": 1.0},
                 "shared BatchNorm": {"aux_bn": False}, "current weights": {"staleness": 0}}


def applied_lr(t: int) -> float:
    """DeepSpeed steps the scheduler after each optimizer step, so step t trains at iteration t−1."""
    return SCHEDULE(t - 1)


def trained_weights(run: dict) -> list[torch.Tensor]:
    """The weights the optimizer updates: the fp32 master copy under bf16."""
    return run["master"] if run["master"] is not None else run["params"]


@pytest.fixture(scope="module")
def shipped(runs):
    """Per shipped case: the reference fed with the engine's recorded draws, the reference with
    each nearest wrong variant, and the reference applying the LR the engine reports per step."""
    steps, out = digits_batches(STEPS), {}
    for case, (block, bf16) in SHIPPED_CASES.items():
        settings = Settings.of(block, bf16=bf16)

        def draws(t, m, r, case=case):
            return attack_draws(runs[r][case]["draws"][t, m])

        with one_thread():
            out[case] = {"ref": reference_run(steps, settings, draws, applied_lr),
                         "reported lr": reference_run(steps, settings, draws, SCHEDULE),
                         **{name: reference_run(steps, settings.but(**change), draws, applied_lr)
                            for name, change in NEAREST_WRONG.items()}}
    return out


@pytest.mark.parametrize("case", SHIPPED_CASES)
def test_shipped_attack_draws_both_starts_and_targets(runs, case):
    """Each micro-batch's attack draws its coin, then its uniform start if the coin says so, then one
    wrong-label shift per sample; both clean and random starts occur (so their control can fail)."""
    starts = []
    for rank in range(WORLD):
        recorded = runs[rank][case]["draws"]
        assert sorted(recorded) == [(t, 0) for t in range(STEPS)]
        for log in recorded.values():
            d = attack_draws(log)
            starts.append(d.coin >= SHIPPED["clean_start_prob"])
            assert (d.uniform is not None) == starts[-1]
            assert d.shift.shape == (MICRO,) and 1 <= d.shift.min() and d.shift.max() <= 9
    assert any(starts) and not all(starts), starts


@pytest.mark.parametrize("case", SHIPPED_CASES)
def test_shipped_delta_matches_reference(runs, shipped, case):
    """δ of every (step, micro-batch, rank) is the reference's from the previous step's weights."""
    ref, eps = shipped[case]["ref"], SHIPPED_CASES[case][0]["epsilon"]
    for rank in range(WORLD):
        ours = {(t, m, rank): d for (t, m), d in runs[rank][case]["deltas"].items()}
        assert {k for k in ref.deltas if k[2] == rank} == ours.keys()
        assert max_delta_diff(ours, ref.deltas) <= REL * eps, (case, rank)


@pytest.mark.parametrize("case", SHIPPED_CASES)
def test_shipped_weights_match_reference(runs, shipped, case):
    """After STEPS steps under the LR schedule, the weights the optimizer holds are the reference's."""
    ref = shipped[case]["ref"]
    assert_follows(trained_weights(runs[0][case]), ref.params, ref.initial, case)


@pytest.mark.parametrize("variant", NEAREST_WRONG)
@pytest.mark.parametrize("case", SHIPPED_CASES)
def test_shipped_reference_catches_the_nearest_wrong_variant(runs, shipped, case, variant):
    """Control: the reference run untargeted, always from δ = 0, through shared BatchNorm or with
    the current weights leaves the engine's weights and δ by far more than their bounds."""
    ref, wrong, eps = shipped[case]["ref"], shipped[case][variant], SHIPPED_CASES[case][0]["epsilon"]
    assert_departs(wrong.params, trained_weights(runs[0][case]), ref.initial, variant)
    ours = {(t, m, r): d for r in range(WORLD) for (t, m), d in runs[r][case]["deltas"].items()}
    assert max_delta_diff(ours, wrong.deltas) > FAR * REL * eps


@pytest.mark.parametrize("case", SHIPPED_CASES)
def test_lr_follows_the_schedule(runs, shipped, case):
    """The LR reported with step t is the schedule's at iteration t — the LR step t+1 trains at
    (DeepSpeed steps the scheduler inside the optimizer step) — on every rank; the LR each step
    trained at is iteration t−1's, as the weights show: the reference applying the reported LRs
    instead leaves the engine's weights."""
    expected = [SCHEDULE(t) for t in range(STEPS)]
    assert len(set(expected)) >= 3
    for rank in range(WORLD):
        assert [m["lr"] for m in runs[rank][case]["metrics"]] == pytest.approx(expected, rel=1e-12)
    ref = shipped[case]["ref"]
    assert_departs(shipped[case]["reported lr"].params, trained_weights(runs[0][case]), ref.initial)


@pytest.mark.parametrize("case", SHIPPED_CASES)
def test_shipped_metrics_are_rank_means(runs, shipped, case):
    """Every rank reports, per step, the mean over ranks of the reference's per-rank losses."""
    for rank in range(WORLD):
        assert_rank_means(runs[rank][case]["metrics"], shipped[case]["ref"].ranks)
