"""LARS and LAMB: layer-wise adaptive optimizers that stay exact under ZeRO 1/2/3.

Both scale each layer's update by a trust ratio built from per-layer norms. Under ZeRO the
optimizer sees flat partitions, so the norms are summed over the pieces this rank owns and
reduced over the data-parallel group, one all-reduce per parameter group, and every rank
applies the same ratio. Parameter groups with `adapt=False` (by default the 1-D ones: biases,
norm weights) get neither weight decay nor a trust ratio, as in timm's `param_groups_weight_decay`.

The step is multi-tensor (see `multi_tensor`). LARS updates its non-adapted group with one pass
of torch's fused SGD kernel per block (lr is a number); its adapted groups, on the CPU, with one
such pass per chunk taking the layer's factor as a number (read to the host, which costs nothing
there), and on accelerators with up to four `torch._foreach_*` ops per block, the factors on the
device.
LAMB computes the moments and r = m̂/(√v̂+ε) + wd·w in one pass with torch's fused Adam kernel
(`torch._fused_adam_`, the kernel behind `Adam(fused=True)`, run with lr = −1 on a buffer
holding wd·w), then `torch._foreach_*` ops, its factors on the device everywhere.
Each optimizer checks its own arguments (`ARGUMENTS`, `check_arguments`): the config factory
validates the JSON against the same rules.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .multi_tensor import GroupPlan, Scratch, block_elements, foreach_norms, make_plan
from .zero_layout import FlatLayout


class Rule(NamedTuple):
    ok: Callable[[Any], bool]
    allowed: str


POSITIVE = Rule(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")
FRACTION = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
FRACTION_PAIR = Rule(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")
OPTIONAL_NON_NEGATIVE = Rule(lambda v: v is None or v >= 0, "must be >= 0 or null")
OPTIONAL_POSITIVE = Rule(lambda v: v is None or v > 0, "must be > 0 or null")


class ArgumentError(ValueError):
    """A bad optimizer argument: one line naming the optimizer, the argument, its value and what is allowed."""

    def __init__(self, owner: str, name: str, value: Any, allowed: str):
        super().__init__(f"{owner}: {name}={value!r}: {allowed}")
        self.name, self.value, self.allowed = name, value, allowed


def broken_rule(rule: Rule, value: Any) -> bool:
    try:
        return not rule.ok(value)
    except TypeError:
        return True


def param_groups(model: nn.Module, weight_decay: float, exclude_1d: bool = True) -> list[dict]:
    """[decayed and adapted params, 1-D params without decay or adaptation] (empty groups dropped)."""
    adapted, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if exclude_1d and p.ndim <= 1 else adapted).append(p)
    groups = [{"params": adapted, "weight_decay": weight_decay, "adapt": True},
              {"params": plain, "weight_decay": 0.0, "adapt": False}]
    return [g for g in groups if g["params"]]


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator per layer, 1 where either is 0."""
    return torch.where((numerator > 0) & (denominator > 0), numerator / denominator, 1.0)


def _step_tensors(steps: list[int], device: torch.device) -> list[Tensor]:
    """Step counts as the fused kernels take them (float tensors on the parameters' device),
    one tensor per distinct count; filled on the device, never copied from the host."""
    made: dict[int, Tensor] = {}
    return [made.setdefault(s, torch.full((), float(s), device=device)) for s in steps]


def _momentum_step(w: list[Tensor], g: list[Tensor], v: list[Tensor], s: float, m: float, wd: float) -> None:
    """v ← m·v + s·(g + wd·w), w ← w − v in one pass over w, g and v, leaving g as it was: torch's
    fused SGD kernel (the one behind `SGD(fused=True)`, on every device) with dampening 1 − s and
    lr 1. The kernel forms s as 1 − (1 − s) in double precision, off by ~1e-16 absolute: below
    float32's resolution of the term for s ≥ 1e-8, and an update smaller than that is lost in
    w's rounding anyway. At m = 0 the buffer is not kept (w ← w − s·(g + wd·w))."""
    torch._fused_sgd_(w, g, v if m else [], weight_decay=wd, momentum=m, lr=1.0 if m else s, dampening=1.0 - s,
                      nesterov=False, maximize=False, is_first_step=False)


class _Layerwise(torch.optim.Optimizer):
    """Shared plumbing: argument checks, per-tensor layouts (set by `bind_layouts` under ZeRO) and
    the cached multi-tensor plan of each group."""

    ARGUMENTS: dict[str, Rule] = {}
    STREAMS = 4
    """Tensors one block of the update touches (sizes the CPU cache blocks)."""

    def __init__(self, params: Iterable, defaults: dict):
        self.check_arguments(**defaults)
        super().__init__(params, {**defaults, "adapt": True})
        self.layouts: dict[int, FlatLayout] = {}
        self._plans: dict[tuple, GroupPlan] = {}

    @classmethod
    def check_arguments(cls, **args: Any) -> None:
        """Raise `ArgumentError` for the first argument outside its range (or a cross-argument rule)."""
        for name, rule in cls.ARGUMENTS.items():
            if name in args and broken_rule(rule, args[name]):
                raise ArgumentError(cls.__name__, name, args[name], rule.allowed)

    def add_param_group(self, param_group: dict) -> None:
        self.check_arguments(**{k: v for k, v in param_group.items() if k != "params"})
        super().add_param_group(param_group)

    def bind_layouts(self, layouts: dict[int, FlatLayout]) -> None:
        self.layouts = layouts
        self._plans.clear()

    def _groups_with_grads(self):
        """(group, its parameters that have gradients, their chunk plan) for every group with work."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                yield group, params, self._plan(params)

    def _plan(self, params: list[Tensor]) -> GroupPlan:
        layouts = [self.layouts.get(id(p)) for p in params]
        key = (params[0].device, tuple(p.numel() for p in params), tuple(map(id, layouts)))
        plan = self._plans.get(key)
        if plan is None:
            device = params[0].device
            block = block_elements(device, self.STREAMS, params[0].element_size())
            plan = self._plans[key] = make_plan([p.numel() for p in params], layouts, device, block)
        return plan


class LARS(_Layerwise):
    """You et al. 2017 in the MLPerf-TF form of the official ConAdv code:
    tr = η‖w‖/(‖g‖ + wd‖w‖ + eps) (1 where ‖w‖ or ‖g‖ is 0, as in timm),
    v ← m·v + lr·tr·(g + wd·w), w ← w − v."""

    ARGUMENTS = {"lr": POSITIVE, "momentum": FRACTION, "weight_decay": NON_NEGATIVE,
                 "trust_coefficient": POSITIVE, "eps": NON_NEGATIVE}
    STREAMS = 3

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group, params, plan in self._groups_with_grads():
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            w, g = plan.chunks(params, "w"), plan.chunks([p.grad for p in params])
            v = plan.chunks([self._buffer(p) for p in params], "v")
            if not group["adapt"]:  # v ← m·v + lr·(g + wd·w), w ← w − v
                for a, b in plan.blocks:
                    _momentum_step(w[a:b], g[a:b], v[a:b], lr, m, wd)
                continue
            tc, eps = group["trust_coefficient"], group["eps"]
            for unit in plan.units:
                u0, u1 = unit.start, unit.stop
                wn, gn = plan.layer_norms(unit, foreach_norms(w[u0:u1] + g[u0:u1]), 2)
                denominator = torch.add(gn, wn, alpha=wd).add_(eps) if eps else torch.add(gn, wn, alpha=wd)
                scale = torch.where((wn > 0) & (gn > 0), wn * (lr * tc) / denominator, lr)  # lr·tr per layer
                # Backwards: the first pieces updated are the last ones the norms read (still in cache).
                if plan.host_factors:  # one fused pass per chunk
                    for c, s in reversed(list(enumerate(plan.per_chunk(unit, scale, host=True), start=u0))):
                        _momentum_step(w[c:c + 1], g[c:c + 1], v[c:c + 1], s, m, wd)
                    continue
                s, s_wd = plan.per_chunk(unit, scale), plan.per_chunk(unit, scale * wd) if wd else None
                for a, b in reversed(plan.unit_blocks(unit)):  # four multi-tensor ops per block
                    vb, wb = v[a:b], w[a:b]
                    torch._foreach_mul_(vb, m)
                    torch._foreach_addcmul_(vb, g[a:b], s[a - u0:b - u0])
                    if wd:
                        torch._foreach_addcmul_(vb, wb, s_wd[a - u0:b - u0])
                    torch._foreach_sub_(wb, vb)
        return loss

    def _buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        return state["momentum_buffer"]


class LAMB(_Layerwise):
    """You et al. 2019: Adam moments with bias correction, r = m̂/(√v̂+ε) + wd·w,
    w ← w − lr·clamp(‖w‖/‖r‖)·r."""

    ARGUMENTS = {"lr": POSITIVE, "betas": FRACTION_PAIR, "eps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
                 "min_trust": OPTIONAL_NON_NEGATIVE, "max_trust": OPTIONAL_POSITIVE}
    STREAMS = 5

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, min_trust: Optional[float] = None, max_trust: Optional[float] = None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      min_trust=min_trust, max_trust=max_trust))
        self._scratch = Scratch()  # r of one unit: under ZeRO, of the rank's whole partition

    @classmethod
    def check_arguments(cls, **args: Any) -> None:
        super().check_arguments(**args)
        lo, hi = args.get("min_trust"), args.get("max_trust")
        if lo is not None and hi is not None and lo > hi:
            raise ArgumentError(cls.__name__, "min_trust", lo, f"must be <= max_trust ({hi})")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group, params, plan in self._groups_with_grads():
            (b1, b2), wd, eps, lr = group["betas"], group["weight_decay"], group["eps"], group["lr"]
            states = [self._state(p) for p in params]
            steps = _step_tensors([st["step"] for st in states], params[0].device)
            steps = [steps[t] for t in plan.chunk_tensor]
            w, g = plan.chunks(params, "w"), plan.chunks([p.grad for p in params])
            m = plan.chunks([st["exp_avg"] for st in states], "m")
            v = plan.chunks([st["exp_avg_sq"] for st in states], "v")
            adam = dict(beta1=b1, beta2=b2, eps=eps, amsgrad=False, maximize=False)
            if not group["adapt"]:  # w ← w − lr·(m̂/(√v̂+ε) + wd·w): AdamW's update
                for a, b in plan.blocks:
                    torch._fused_adamw_(w[a:b], g[a:b], m[a:b], v[a:b], [], steps[a:b], lr=lr, weight_decay=wd, **adam)
                continue
            for unit in plan.units:
                r = list(self._scratch.take(sum(unit.chunk_sizes), params[0]).split_with_sizes(unit.chunk_sizes))
                norms = []
                for a, b in plan.unit_blocks(unit):
                    rb = r[a - unit.start:b - unit.start]
                    # r ← wd·w + m̂/(√v̂+ε): Adam's step with lr = −1 on r (the moments updated on the way).
                    if wd:
                        torch._foreach_copy_(rb, w[a:b])
                        torch._foreach_mul_(rb, wd)
                    else:
                        torch._foreach_zero_(rb)
                    torch._fused_adam_(rb, g[a:b], m[a:b], v[a:b], [], steps[a:b], lr=-1.0, weight_decay=0.0, **adam)
                    norms.append(torch._foreach_norm([*w[a:b], *rb]))  # while the block is in cache
                wn = [n for bn in norms for n in bn[:len(bn) // 2]]
                rn = [n for bn in norms for n in bn[len(bn) // 2:]]
                wn, rn = plan.layer_norms(unit, wn + rn, 2)
                trust = _ratio(wn, rn)
                if group["min_trust"] is not None or group["max_trust"] is not None:
                    trust = trust.clamp(group["min_trust"], group["max_trust"])
                if r:  # backwards: the last r written are in cache
                    step = plan.per_chunk(unit, -lr * trust)
                    torch._foreach_addcmul_(w[unit.start:unit.stop][::-1], r[::-1], step[::-1])
        return loss

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros(p.numel(), dtype=p.dtype, device=p.device),
                         exp_avg_sq=torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
        state["step"] += 1
        return state
