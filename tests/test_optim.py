"""LARS and LAMB against hand-written single-process formulas; exact under ZeRO 1/2/3 on 2 ranks,
with one all-reduce per parameter group on the parameters' device and no host sync per
parameter; their own argument checks; schedules against closed forms; optimizer/scheduler
config errors."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.distributed import launch

MICRO, WORLD, STEPS = 8, 2, 5
OPTIMIZERS = {
    "LARS": {"type": "LARS", "params": {"lr": 2.0, "momentum": 0.9, "weight_decay": 1e-3,
                                        "trust_coefficient": 0.02}},
    "LAMB": {"type": "LAMB", "params": {"lr": 0.05, "betas": [0.9, 0.99], "eps": 1e-6, "weight_decay": 0.01}},
}


def make_mlp() -> nn.Module:
    """A 64×64 layer that the ZeRO-1/2 partition boundary cuts in two, with very different
    magnitudes in its halves, then a small layer: per-partition trust ratios would be wrong."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[:16] *= 20.0
    return model


def mlp_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * MICRO, 64, generator=g), torch.randint(0, 10, (WORLD * MICRO,), generator=g))
            for _ in range(STEPS)]


def reference(name: str) -> list[torch.Tensor]:
    """The optimizer's formulas written out per parameter, on the global batch."""
    model = make_mlp()
    hp = dict(OPTIMIZERS[name]["params"])
    state = {}
    for t, (x, y) in enumerate(mlp_batches(), start=1):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                g, adapt = p.grad, p.ndim > 1
                wd = hp["weight_decay"] if adapt else 0.0
                if name == "LARS":
                    wn, gn = p.norm(), g.norm()
                    tr = hp["trust_coefficient"] * wn / (gn + wd * wn) if adapt and wn > 0 and gn > 0 else 1.0
                    v = state.setdefault(i, torch.zeros_like(p))
                    v.mul_(hp["momentum"]).add_(hp["lr"] * tr * (g + wd * p))
                    p.sub_(v)
                else:
                    b1, b2 = hp["betas"]
                    m, v = state.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
                    m.mul_(b1).add_((1 - b1) * g)
                    v.mul_(b2).add_((1 - b2) * g * g)
                    r = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + hp["eps"]) + wd * p
                    trust = p.norm() / r.norm() if adapt and p.norm() > 0 and r.norm() > 0 else 1.0
                    p.sub_(hp["lr"] * trust * r)
    return [p.detach().clone() for p in model.parameters()]


def rel_err(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("optim") / "r.pt"
    launch("optim_worker.py", "--out", str(out))
    return {**torch.load(out, weights_only=False), "out": str(out)}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_matches_reference_formulas_under_zero(runs, name, stage):
    assert rel_err(runs[f"{name}/z{stage}"]["params"], reference(name)) <= 1e-5


def test_matches_reference_with_the_optimizer_offloaded(runs):
    assert rel_err(runs["LAMB/z2/offload"]["params"], reference("LAMB")) <= 1e-5


@pytest.mark.parametrize("case,name", [("LARS/z2/naive", "LARS"), ("LAMB/z1/naive", "LAMB")])
def test_per_partition_ratios_would_be_wrong(runs, case, name):
    """Control: the same optimizer without the ZeRO layout (per-partition norms) goes astray."""
    assert rel_err(runs[case]["params"], reference(name)) > 1e-3


@pytest.mark.parametrize("case", [f"{n}/z{s}" for s in (0, 1, 2, 3) for n in OPTIMIZERS] + ["LAMB/z2/offload"])
def test_one_all_reduce_per_group_on_the_parameters_device(runs, case):
    """Per optimizer step, the adapted group's per-layer sums (‖w‖², ‖g‖² or ‖r‖² of its 2 layers)
    go through one all-reduce on the parameters' device (= the accelerator's device); the plain
    group (biases) needs none; without ZeRO there is nothing to reduce."""
    run = runs[case]
    calls = [c for step in run["collectives"] for c in step]
    if case.endswith("z0"):
        assert calls == []
        return
    assert all(len(step) <= 1 for step in run["collectives"])
    assert [name for name, _, _ in calls] == ["all_reduce"] * STEPS
    assert {numel for _, _, numel in calls} == {2 * 2}
    assert {device for _, device, _ in calls} == run["param_devices"] == {runs["accelerator_device"]}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("block", [None, 700, "accelerator"])
def test_without_zero_matches_reference(name, block, monkeypatch):
    """One process, the model's own parameters: default CPU blocks; blocks of 700 elements, which
    cut the 64×64 layer into chunks and pack the small layer with the end of it (several blocks and
    units per group); and the accelerator's plan (no blocks: one unit of whole layers, factors on
    the device)."""
    from conadv_ds.optim import build_optimizer, layerwise, multi_tensor

    if block == "accelerator":
        monkeypatch.setattr(layerwise, "block_elements", lambda *args: None)
    else:
        monkeypatch.setattr(multi_tensor, "BLOCK_ELEMENTS", block)
    model = make_mlp()
    opt = build_optimizer(OPTIMIZERS[name], model)
    for x, y in mlp_batches():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # gradients left as they were
    assert rel_err([p.detach() for p in model.parameters()], reference(name)) <= 1e-5


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_rank_owning_no_piece_still_reduces(runs, name):
    """Under ZeRO a rank's partition of a small group may be all padding: on 2 real ranks, the
    rank with no piece still takes part in the group's all-reduce (with zeros), else the other
    would time out (here: 20 s, instead of waiting forever), and the rank holding the pieces
    updates them as the same optimizer does on the whole layers in one process."""
    owner, empty = (torch.load(f"{runs['out']}.no_piece{r}", weights_only=False)[name] for r in (0, 1))
    assert owner["error"] is None and empty["error"] is None, (owner["error"], empty["error"])
    assert not torch.equal(owner["flat"], owner["start"])  # the step moved the weights
    assert torch.allclose(owner["flat"], owner["alone"], rtol=1e-6, atol=1e-7)
    assert not empty["flat"].any()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_from_state_dict_is_exact(name):
    from conadv_ds.optim import build_optimizer

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    batches = mlp_batches()
    straight = make_mlp()
    train(straight, build_optimizer(OPTIMIZERS[name], straight), batches)
    first = make_mlp()
    opt = build_optimizer(OPTIMIZERS[name], first)
    train(first, opt, batches[:2])
    resumed = make_mlp()
    resumed.load_state_dict(first.state_dict())
    opt2 = build_optimizer(OPTIMIZERS[name], resumed)
    opt2.load_state_dict(opt.state_dict())
    train(resumed, opt2, batches[2:])
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def host_syncs_per_step(name: str, depth: int) -> int:
    """Tensor-to-host conversions during one step of a `depth`-layer MLP (after the first)."""
    from conadv_ds.optim import build_optimizer
    from tests.common import counting_host_syncs

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(depth)])
    opt = build_optimizer(OPTIMIZERS[name], model)
    model(torch.randn(4, 32)).square().sum().backward()
    opt.step()
    with counting_host_syncs() as count:
        opt.step()
    return count.count


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("plan", ["cpu", "accelerator"])
def test_step_makes_no_host_sync_per_parameter(name, plan, monkeypatch):
    """Wrapping Tensor.item/tolist/__float__/__int__/__bool__ during a step: the count does not
    grow with the number of parameters. On an accelerator's plan it is zero (trust ratios stay on
    the device); on the CPU's, LARS reads its factors once per unit (here one), for its fused
    kernel, and LAMB never."""
    from conadv_ds.optim import layerwise

    if plan == "accelerator":
        monkeypatch.setattr(layerwise, "block_elements", lambda *args: None)
    counts = [host_syncs_per_step(name, depth) for depth in (2, 12)]
    expected = 1 if name == "LARS" and plan == "cpu" else 0
    assert counts == [expected, expected]


ARGUMENT_ERRORS = [
    ("LARS", {"lr": -1}, "LARS: lr=-1: must be > 0"),
    ("LARS", {"lr": 0.1, "momentum": 1.0}, "LARS: momentum=1.0: must be in [0, 1)"),
    ("LARS", {"lr": 0.1, "weight_decay": -1e-4}, "LARS: weight_decay=-0.0001: must be >= 0"),
    ("LARS", {"lr": 0.1, "trust_coefficient": 0.0}, "LARS: trust_coefficient=0.0: must be > 0"),
    ("LARS", {"lr": 0.1, "eps": -1.0}, "LARS: eps=-1.0: must be >= 0"),
    ("LAMB", {"lr": 0}, "LAMB: lr=0: must be > 0"),
    ("LAMB", {"lr": 1e-3, "betas": (0.9, 1.0)}, "LAMB: betas=(0.9, 1.0): must be two numbers in [0, 1)"),
    ("LAMB", {"lr": 1e-3, "eps": -1e-8}, "LAMB: eps=-1e-08: must be >= 0"),
    ("LAMB", {"lr": 1e-3, "weight_decay": -0.1}, "LAMB: weight_decay=-0.1: must be >= 0"),
    ("LAMB", {"lr": 1e-3, "max_trust": 0.0}, "LAMB: max_trust=0.0: must be > 0 or null"),
    ("LAMB", {"lr": 1e-3, "min_trust": 2.0, "max_trust": 1.0}, "LAMB: min_trust=2.0: must be <= max_trust (1.0)"),
]


@pytest.mark.parametrize("name,kwargs,expected", ARGUMENT_ERRORS)
def test_optimizer_checks_its_own_arguments(name, kwargs, expected):
    """Built directly (no config), as timm's optimizers do: a one-line ValueError naming the
    argument, its value and what is allowed."""
    from conadv_ds import optim

    with pytest.raises(ValueError) as e:
        getattr(optim, name)(make_mlp().parameters(), **kwargs)
    assert str(e.value) == expected


def test_param_group_arguments_are_checked_too():
    from conadv_ds.optim import LARS

    model = make_mlp()
    with pytest.raises(ValueError, match=r"^LARS: lr=-0.5: must be > 0$"):
        LARS([{"params": list(model[0].parameters()), "lr": -0.5}], lr=0.1)
    opt = LARS(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^LARS: momentum=1.5: must be in \[0, 1\)$"):
        opt.add_param_group({"params": list(model[2].parameters()), "momentum": 1.5})


def test_one_dimensional_params_are_not_adapted_or_decayed():
    from conadv_ds.optim import LARS, param_groups

    model = make_mlp()
    groups = param_groups(model, weight_decay=0.5)
    assert [len(g["params"]) for g in groups] == [2, 2] and groups[1]["weight_decay"] == 0.0
    opt = LARS(groups, lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=0.001)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    bias_before = model[0].bias.detach().clone()
    weight_before = model[0].weight.detach().clone()
    opt.step()
    assert torch.allclose(model[0].bias, bias_before - 0.1)  # plain SGD: no trust ratio, no decay
    w, g = weight_before, torch.ones_like(weight_before)
    tr = 0.001 * w.norm() / (g.norm() + 0.5 * w.norm())
    assert torch.allclose(model[0].weight, w - 0.1 * tr * (g + 0.5 * w))
    all_groups = param_groups(model, weight_decay=0.5, exclude_1d=False)
    assert len(all_groups) == 1 and len(all_groups[0]["params"]) == 4


def test_lamb_trust_clamp():
    from conadv_ds.optim import LAMB

    p = nn.Parameter(torch.full((4, 4), 10.0))
    p.grad = torch.full((4, 4), 1e-3)
    opt = LAMB([{"params": [p], "weight_decay": 0.0, "adapt": True}], lr=0.1, max_trust=2.0)
    opt.step()
    # r = m̂/(√v̂+ε) ≈ 1 per element, ‖w‖/‖r‖ = 10 → clamped to 2.
    assert torch.allclose(p.detach(), torch.full((4, 4), 10.0 - 0.1 * 2.0), atol=1e-3)


@pytest.mark.parametrize("step,expected", [(0, 0.1), (5, 0.1 + (1.0 - 0.1) * 5 / 10), (10, 1.0),
                                           (55, 0.01 + (1.0 - 0.01) * (1 - 45 / 90) ** 1.6), (100, 0.01),
                                           (150, 0.01)])
def test_warmup_poly_decay_closed_form(step, expected):
    from conadv_ds.optim import WarmupPolyDecay

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPolyDecay(opt, warmup_num_steps=10, total_num_steps=100, warmup_min_lr=0.1, power=1.6, end_lr=0.01)
    for _ in range(step):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)
    restored = WarmupPolyDecay(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 10, 100, 0.1, 1.6, 0.01)
    restored.load_state_dict(sched.state_dict())
    assert restored.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("rule,factor", [("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling(rule, factor):
    from conadv_ds.optim import prepare_ds_config

    ds = {"train_batch_size": 1024, "lr_scaling": {"rule": rule, "reference_batch_size": 256},
          "optimizer": {"type": "LARS", "params": {"lr": 0.5}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 0.5, "warmup_min_lr": 0.01,
                                                            "total_num_steps": 10}}}
    out, opt, sched = prepare_ds_config(ds, 4)
    assert opt["params"]["lr"] == pytest.approx(0.5 * factor)
    assert out["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(0.5 * factor)
    assert out["scheduler"]["params"]["warmup_min_lr"] == pytest.approx(0.01 * factor)
    assert "lr_scaling" not in out and "optimizer" not in out and sched is None
    assert ds["optimizer"]["params"]["lr"] == 0.5  # input untouched


BAD = [
    ({"optimizer": {"type": "LARS", "params": {"lr": -1}}}, "optimizer.params.lr=-1: must be > 0"),
    ({"optimizer": {"type": "LARS", "params": {"lr": 1, "momentum": 1.0}}}, "optimizer.params.momentum=1.0: must be in [0, 1)"),
    ({"optimizer": {"type": "LARS", "params": {"lr": 1, "trust_coef": 0.1}}}, "did you mean 'trust_coefficient'"),
    ({"optimizer": {"type": "LARS", "params": {}}}, "optimizer.params.lr"),
    ({"optimizer": {"type": "LAMB", "params": {"lr": 1, "betas": [0.9, 1.2]}}}, "optimizer.params.betas"),
    ({"optimizer": {"type": "LAMB", "params": {"lr": 1, "min_trust": 2, "max_trust": 1}}}, "optimizer.params.min_trust=2.0: must be <= max_trust (1.0)"),
    ({"optimizer": {"type": "LAMB", "params": {"lr": 1, "weight_decay": -0.1}}}, "optimizer.params.weight_decay=-0.1: must be >= 0"),
    ({"optimizer": "LARS"}, "optimizer='LARS': must be a JSON object with a string 'type'"),
    ({"scheduler": {"type": "WarmupPolyDecay", "params": {"total_num_steps": 10}}}, "set exactly one of warmup_num_steps and warmup_ratio"),
    ({"scheduler": {"type": "WarmupPolyDecay", "params": {"total_num_steps": 10, "warmup_num_steps": 20}}}, "scheduler.params.warmup_num_steps=20: must be in [0, total_num_steps=10]"),
    ({"scheduler": {"type": "WarmupPolyDecay", "params": {"total_num_steps": 10, "warmup_ratio": 1.5}}}, "scheduler.params.warmup_ratio=1.5"),
    ({"scheduler": {"type": "WarmupPolyDecay", "params": {"total_num_steps": 10, "warmup_ratio": 0.1, "power": 0}}}, "scheduler.params.power=0: must be > 0"),
    ({"lr_scaling": {"rule": "cubic", "reference_batch_size": 256}}, "lr_scaling.rule='cubic'"),
    ({"lr_scaling": {"rule": "linear", "reference_batch_size": 0}}, "lr_scaling.reference_batch_size=0: must be >= 1"),
]


@pytest.mark.parametrize("patch,expected", BAD)
def test_bad_optimizer_and_scheduler_blocks(patch, expected):
    from conadv_ds.errors import ConfigError
    from conadv_ds.optim import prepare_ds_config

    with pytest.raises(ConfigError) as e:
        prepare_ds_config({"train_batch_size": 64, **patch}, 2)
    assert expected in str(e.value) and "\n" not in str(e.value)
