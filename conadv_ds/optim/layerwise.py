"""LARS and LAMB: layer-wise adaptive optimizers that stay exact under ZeRO 1/2/3.

Both scale each layer's update by a trust ratio built from per-layer norms. Under ZeRO the
optimizer sees flat partitions, so the norms come from `zero_layout.layer_norms` (pieces owned by
this rank, reduced over the data-parallel group) and every rank applies the same ratio.
Parameter groups with `adapt=False` (by default the 1-D ones: biases, norm weights) get neither
weight decay nor a trust ratio, as in timm's `param_groups_weight_decay`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .zero_layout import FlatLayout, layer_norms, single_layer


def param_groups(model: nn.Module, weight_decay: float, exclude_1d: bool = True) -> list[dict]:
    """[decayed and adapted params, 1-D params without decay or adaptation] (empty groups dropped)."""
    adapted, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (plain if exclude_1d and p.ndim <= 1 else adapted).append(p)
    groups = [{"params": adapted, "weight_decay": weight_decay, "adapt": True},
              {"params": plain, "weight_decay": 0.0, "adapt": False}]
    return [g for g in groups if g["params"]]


class _Layerwise(torch.optim.Optimizer):
    """Shared plumbing: per-tensor layouts (set by `bind_layouts` under ZeRO) and trust ratios."""

    def __init__(self, params: Iterable, defaults: dict):
        super().__init__(params, defaults)
        self.layouts: dict[int, FlatLayout] = {}

    def bind_layouts(self, layouts: dict[int, FlatLayout]) -> None:
        self.layouts = layouts

    def _layout(self, p: Tensor) -> FlatLayout:
        return self.layouts.get(id(p)) or single_layer(p)

    @staticmethod
    def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
        """numerator / denominator per layer, 1 where either is 0."""
        ok = (numerator > 0) & (denominator > 0)
        return torch.where(ok, numerator / torch.where(ok, denominator, torch.ones_like(denominator)),
                           torch.ones_like(numerator))


class LARS(_Layerwise):
    """You et al. 2017 in the MLPerf-TF form of the official ConAdv code:
    tr = η‖w‖/(‖g‖ + wd‖w‖ + eps), v ← m·v + lr·tr·(g + wd·w), w ← w − v."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = p.view(-1), p.grad.view(-1)
                layout = self._layout(p)
                if group["adapt"]:
                    wn, gn = layer_norms(layout, [w, g])
                    scale = (lr * self._ratio(group["trust_coefficient"] * wn, gn + wd * wn + group["eps"])).tolist()
                else:
                    scale = [lr] * layout.num_layers
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(w))
                for li, start, n in layout.segments:
                    wi, vi = w.narrow(0, start, n), buf.narrow(0, start, n)
                    vi.mul_(m).add_(g.narrow(0, start, n), alpha=scale[li])
                    if wd:
                        vi.add_(wi, alpha=scale[li] * wd)
                    wi.sub_(vi)
        return loss


class LAMB(_Layerwise):
    """You et al. 2019: Adam moments with bias correction, r = m̂/(√v̂+ε) + wd·w,
    w ← w − lr·clamp(‖w‖/‖r‖)·r."""

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, min_trust: Optional[float] = None, max_trust: Optional[float] = None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      min_trust=min_trust, max_trust=max_trust, adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            (b1, b2), wd = group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = p.view(-1), p.grad.view(-1)
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                r = state["exp_avg_sq"].div(1 - b2 ** t).sqrt_().add_(group["eps"])  # one temporary, reused
                torch.div(state["exp_avg"], r, out=r).div_(1 - b1 ** t)
                if wd:
                    r.add_(w, alpha=wd)
                layout = self._layout(p)
                if group["adapt"]:
                    wn, rn = layer_norms(layout, [w, r])
                    trust = self._ratio(wn, rn)
                    if group["min_trust"] is not None or group["max_trust"] is not None:
                        trust = trust.clamp(group["min_trust"], group["max_trust"])
                    scale = (group["lr"] * trust).tolist()
                else:
                    scale = [group["lr"]] * layout.num_layers
                for li, start, n in layout.segments:
                    w.narrow(0, start, n).sub_(r.narrow(0, start, n), alpha=scale[li])
        return loss
