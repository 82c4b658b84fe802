"""A plain-PyTorch reference of ConAdv as the shipped configs run it, for the 2-rank engine tests.

The paper configs (ds_configs/*.json) and the demo attack targeted (towards a random wrong
label), start PGD from δ = 0 with probability `clean_start_prob` and from a random point
otherwise, route the adversarial forwards through auxiliary BatchNorm and may train in bf16.
Those attacks draw random numbers, so the reference cannot be a closed formula of the data:
`recorded_draws` logs, in order, every random number the engine's attack draws on a rank
(inside the worker), `attack_draws` reads one micro-batch's log strictly, and `reference_run`
turns the draws into δ and weights with its own code. It knows nothing of conadv_ds: only the
model, data and constants of `tests.common`.

What the draws mean: one coin per micro-batch (a random start when the coin ≥ `clean_start_prob`;
the ImageNet-Adversarial-Training attacker that the official ConAdv code builds on also draws one
per batch), a uniform U ∈ [0, 1) per input element for the random start (L∞: δ = (2U−1)·ε, uniform
in the box; L2: δ = (2U−1)·ε/√d for d elements per sample, FreeLB's start, inside the ball), and a
shift s ∈ {1, …, C−1} per label, the target being (y + s) mod C.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.common import LR, MOMENTUM, WORLD, make_model, rank_slice

DEMO_CONFIG = Path(__file__).parent.parent / "ds_configs" / "demo.json"
SHIPPED = {"norm": "linf", "adv_weight": 0.5, "clip_range": [0.0, 1.0], "attack_bn": "train",
           **json.loads(DEMO_CONFIG.read_text())["conadv"]}
"""The demo's `conadv` block (targeted, clean start 0.2, τ = 1, auxiliary BatchNorm, one step of
ε = 9/255), with the keys it leaves at their defaults written out, so that the engine and the
reference read the same settings."""

SHIPPED_L2 = {"norm": "l2", "epsilon": 1.0, "step_size": 0.5, "steps": 2}
"""The shipped attack in L2 (pixel space: ε is δ's norm over the 64 pixels of a digit), two steps."""

CLASSES = 10
SCHEDULER = {"type": "WarmupDecayLR",
             "params": {"warmup_min_lr": 0.01, "warmup_max_lr": LR, "warmup_num_steps": 2, "total_num_steps": 4}}
"""The demo's scheduler type with its warmup and decay squeezed into the tests' four steps: the
scheduler's iterations 0-3 give 0.01, 0.05, 0.05, 0.03."""

_TORCH_DRAWS = ("rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
                "multinomial", "normal")
_TENSOR_DRAWS = ("uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_",
                 "log_normal_")


@contextlib.contextmanager
def recorded_draws():
    """Inside the block, every torch sampling function and in-place sampling method, and
    `random.Random.random`, also appends `(name, value drawn)` to the yielded list."""
    log: list[tuple[str, object]] = []
    patched = []

    def record(owner, name):
        original = getattr(owner, name)

        def drawing(*args, **kwargs):
            out = original(*args, **kwargs)
            log.append((name, out.detach().clone() if isinstance(out, Tensor) else out))
            return out

        patched.append((owner, name, original))
        setattr(owner, name, drawing)

    for name in _TORCH_DRAWS:
        record(torch, name)
    for name in _TENSOR_DRAWS:
        record(torch.Tensor, name)
    record(random.Random, "random")
    try:
        yield log
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


@dataclass(frozen=True)
class AttackDraws:
    """The random numbers of one micro-batch's attack."""

    coin: float
    uniform: Optional[Tensor]
    """U[0, 1) per input element; drawn only for a random start."""
    shift: Optional[Tensor]
    """The target's offset from the label per sample, in {1, …, C−1}; drawn only when targeted."""


def attack_draws(log: list[tuple[str, object]]) -> AttackDraws:
    """One micro-batch's recorded draws, which must be exactly: the coin, then the uniform start
    if any, then the target shifts if any — anything else is a draw the reference does not know."""
    names = [name for name, _ in log]
    assert names[:1] == ["random"], f"the attack's first draw is not the clean-start coin: {names}"
    rest = dict(log[1:])
    assert names[1:] in ([], ["rand"], ["randint"], ["rand", "randint"]), f"unexpected draws: {names}"
    return AttackDraws(coin=log[0][1], uniform=rest.get("rand"), shift=rest.get("randint"))


@dataclass(frozen=True)
class Settings:
    """What the reference can run: an L∞ or L2 PGD attack with BatchNorm in train mode, x+δ kept
    in `clip`, the loss (1−λ)·CE(x) + λ·CE(x+δ), SGD with momentum in fp32. bf16 as the recipes
    run it: forward and backward on bf16 copies of fp32 master weights, BatchNorm computed in fp32
    with fp32 statistics, the ranks' gradients summed in bf16 as DeepSpeed's reduction does
    (exact for one micro-batch per step)."""

    norm: str
    epsilon: float
    step_size: float
    steps: int
    targeted: bool
    clean_start_prob: float
    aux_bn: bool
    staleness: int
    adv_weight: float
    clip: tuple[float, float]
    bf16: bool = False

    @classmethod
    def of(cls, block: dict, bf16: bool = False) -> "Settings":
        """The settings of a `conadv` block; keys the reference does not model are an error."""
        known = {"schedule", "staleness", "norm", "epsilon", "step_size", "steps", "targeted", "clean_start_prob",
                 "aux_bn", "adv_weight", "clip_range", "attack_bn"}
        assert set(block) <= known, f"keys the reference does not model: {sorted(set(block) - known)}"
        assert block["attack_bn"] == "train", "the reference attacks with BatchNorm in train mode only"
        staleness = 0 if block.get("schedule") == "disadv" else block["staleness"]
        return cls(norm=block["norm"], epsilon=block["epsilon"], step_size=block["step_size"], steps=block["steps"],
                   targeted=block["targeted"], clean_start_prob=block["clean_start_prob"], aux_bn=block["aux_bn"],
                   staleness=staleness, adv_weight=block["adv_weight"], clip=tuple(block["clip_range"]), bf16=bf16)

    def but(self, **changes) -> "Settings":
        return replace(self, **changes)


class TwoBranchBatchNorm(nn.Module):
    """A BatchNorm and an auxiliary copy of it (same initial state); `adversarial` picks the copy
    (AdvProp): each branch normalises with its own batch statistics and has its own affine
    parameters and running statistics. `fp32`: normalise in fp32 whatever the input's dtype."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.main, self.aux = bn, copy.deepcopy(bn)
        self.adversarial = self.fp32 = False

    def forward(self, x: Tensor) -> Tensor:
        bn = self.aux if self.adversarial else self.main
        if not self.fp32:
            return bn(x)
        return F.batch_norm(x.float(), bn.running_mean, bn.running_var, bn.weight.float(), bn.bias.float(),
                            bn.training, bn.momentum, bn.eps).to(x.dtype)


def reference_model(seed: int = 0) -> nn.Module:
    """tests.common's SmallCNN with both BatchNorms split into a main and an auxiliary branch:
    its parameters come in the order of the engine's model with auxiliary BatchNorm."""
    model = make_model(seed)
    model.bn1, model.bn2 = TwoBranchBatchNorm(model.bn1), TwoBranchBatchNorm(model.bn2)
    return model


@contextlib.contextmanager
def adversarial_bn(model: nn.Module, enabled: bool):
    """Inside the block, every `TwoBranchBatchNorm` of `model` uses its auxiliary branch (if enabled)."""
    layers = [m for m in model.modules() if isinstance(m, TwoBranchBatchNorm)] if enabled else []
    for m in layers:
        m.adversarial = True
    try:
        yield
    finally:
        for m in layers:
            m.adversarial = False


def _per_sample_l2(t: Tensor) -> Tensor:
    return t.flatten(1).float().norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _admissible(x: Tensor, delta: Tensor, s: Settings) -> Tensor:
    """δ moved into the ε-ball, then shrunk so that x+δ lies in `s.clip`."""
    if s.norm == "linf":
        delta = delta.clamp(-s.epsilon, s.epsilon)
    else:
        delta = (delta * (s.epsilon / _per_sample_l2(delta).clamp_min(1e-12)).clamp(max=1.0)).to(delta.dtype)
    return (x + delta).clamp(*s.clip) - x


def reference_attack(model: nn.Module, x: Tensor, y: Tensor, draws: Optional[AttackDraws], s: Settings) -> Tensor:
    """δ for one micro-batch against `model` as it is: PGD with BatchNorm in train mode (through
    the auxiliary branch with `s.aux_bn`), running statistics left as they were. `draws` may be
    None only for an attack that needs none (untargeted, always from δ = 0)."""
    saved = {k: b.clone() for k, b in model.named_buffers()}
    start_random = draws is not None and draws.coin >= s.clean_start_prob
    if start_random:
        assert draws.uniform is not None, "a random start whose uniform numbers the engine did not draw"
        radius = s.epsilon if s.norm == "linf" else s.epsilon / math.sqrt(x[0].numel())
        delta = (draws.uniform.to(x.dtype) * 2 - 1) * radius
    else:
        delta = torch.zeros_like(x)
    if s.targeted:
        assert draws is not None and draws.shift is not None, "a targeted attack whose targets were not drawn"
        target = (y + draws.shift) % CLASSES
    model.train()
    with adversarial_bn(model, s.aux_bn):
        delta = _admissible(x, delta, s)
        for _ in range(s.steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            loss = -F.cross_entropy(logits.float(), target) if s.targeted else F.cross_entropy(logits, y)
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                step = g.sign() if s.norm == "linf" else (g.float() / _per_sample_l2(g).clamp_min(1e-12)).to(g.dtype)
                delta = _admissible(x, delta + s.step_size * step, s)
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(saved[k])
    return delta.detach()


def warmup_decay_lr(warmup_min_lr: float, warmup_max_lr: float, warmup_num_steps: int,
                    total_num_steps: int) -> Callable[[int], float]:
    """DeepSpeed's WarmupDecayLR (default log warmup) as a function of the scheduler's iteration
    `it` (−1 before its first step): min + (max − min)·γ, γ = log(it+1)/log(W) while it < W, then
    max(0, (T − it)/(T − W)); W is at least 2."""
    w = max(2, warmup_num_steps)

    def lr(it: int) -> float:
        if it < 0:
            return warmup_min_lr
        gamma = math.log(it + 1) / math.log(w) if it < w else max(0.0, (total_num_steps - it) / (total_num_steps - w))
        return warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma

    return lr


@dataclass
class Trajectory:
    """What `reference_run` computed."""

    names: list[str]
    initial: list[Tensor]
    params: list[Tensor]
    """Final fp32 weights (the master copy under bf16), in the engine model's parameter order."""
    deltas: dict[tuple[int, int, int], Tensor]
    """δ per (step, micro-batch, rank)."""
    ranks: list[list[dict[str, float]]]
    """Per step, per rank: that rank's clean_loss, adv_loss and loss (means over its micro-batches),
    and its correct / counted labels on the clean and adversarial inputs."""

    def main_branch(self) -> list[Tensor]:
        """The final weights without the auxiliary BatchNorm's: those of a model without one."""
        return [p for name, p in zip(self.names, self.params) if ".aux." not in name]


def reference_run(steps: list, s: Settings, draws: Optional[Callable[[int, int, int], AttackDraws]] = None,
                  lr_of_step: Callable[[int], float] = lambda t: LR, seed: int = 0) -> Trajectory:
    """Data-parallel ConAdv on WORLD emulated ranks: δ of step t on rank r's slice of micro-batch m
    is `reference_attack` against the weights before step max(t − staleness, 0), with the random
    numbers `draws(t, m, r)`; the gradient is the mean over ranks and micro-batches of
    (1−λ)·CE(x) + λ·CE(x+δ), the clean forward through the main BatchNorm, the adversarial one
    through the auxiliary branch with `s.aux_bn`; SGD with momentum at `lr_of_step(t)`."""
    master = reference_model(seed)
    model = copy.deepcopy(master) if s.bf16 else master
    if s.bf16:  # DeepSpeed casts the parameters (not the buffers) to bf16, then copies them to fp32 masters
        with torch.no_grad():
            for p, q in zip(model.parameters(), master.parameters()):
                p.data = p.data.to(torch.bfloat16)
                q.copy_(p)
        for m in model.modules():
            if isinstance(m, TwoBranchBatchNorm):
                m.fp32 = True
    dtype = torch.bfloat16 if s.bf16 else torch.float32
    opt = torch.optim.SGD(master.parameters(), lr=LR, momentum=MOMENTUM)
    initial = [p.detach().clone() for p in master.parameters()]
    history, deltas, ranks = [], {}, []
    for t, micro_batches in enumerate(steps):
        if s.bf16:
            with torch.no_grad():
                for p, q in zip(model.parameters(), master.parameters()):
                    p.copy_(q)
        history.append(copy.deepcopy(model.state_dict()))
        attacker = copy.deepcopy(model)
        attacker.load_state_dict(history[max(t - s.staleness, 0)])
        for m, mb in enumerate(micro_batches):
            for r in range(WORLD):
                x, y = rank_slice(mb, r)
                deltas[t, m, r] = reference_attack(attacker, x.to(dtype), y, draws and draws(t, m, r), s)
        opt.zero_grad()
        n, per_rank = len(micro_batches) * WORLD, []
        for r in range(WORLD):
            sums = dict.fromkeys(("clean_loss", "adv_loss", "loss", "correct", "counted", "adv_correct"), 0.0)
            for m, mb in enumerate(micro_batches):
                x, y = rank_slice(mb, r)
                x = x.to(dtype)
                clean_out = model(x)
                with adversarial_bn(model, s.aux_bn):
                    adv_out = model(x + deltas[t, m, r])
                clean, adv = F.cross_entropy(clean_out, y), F.cross_entropy(adv_out, y)
                loss = (1 - s.adv_weight) * clean + s.adv_weight * adv
                (loss / n).backward()
                for key, v in (("clean_loss", clean), ("adv_loss", adv), ("loss", loss)):
                    sums[key] += v.item() / len(micro_batches)
                sums["correct"] += (clean_out.argmax(1) == y).sum().item()
                sums["adv_correct"] += (adv_out.argmax(1) == y).sum().item()
                sums["counted"] += len(y)
            per_rank.append(sums)
        ranks.append(per_rank)
        if s.bf16:  # the ranks' bf16 gradients (each divided by WORLD) were summed in bf16 by backward
            for p, q in zip(model.parameters(), master.parameters()):
                q.grad, p.grad = (None if p.grad is None else p.grad.float()), None
        for group in opt.param_groups:
            group["lr"] = lr_of_step(t)
        opt.step()
    return Trajectory(names=[name for name, _ in master.named_parameters()], initial=initial,
                      params=[p.detach().clone() for p in master.parameters()], deltas=deltas, ranks=ranks)
