"""PGD as pure tensor functions: no models, no DeepSpeed, no global random state.

Norms are per sample (every dimension but the first). An optional `mask`, broadcastable to
the input, marks the positions that may be perturbed (e.g. non-padding tokens).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from torch import Tensor

Norm = Literal["linf", "l2"]
_TINY = 1e-12


def _per_sample(t: Tensor) -> Tensor:
    """Reduce all but the first dimension, keeping them for broadcasting."""
    return t.reshape(t.shape[0], -1)


def _l2(t: Tensor) -> Tensor:
    return _per_sample(t).float().norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _mask_like(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return torch.ones_like(x)
    return mask.to(x.dtype).expand_as(x)


def random_start(x: Tensor, norm: Norm, epsilon: float | Tensor, generator: torch.Generator,
                 mask: Optional[Tensor] = None) -> Tensor:
    """A random point in the ε-ball: uniform per coordinate for L∞; for L2 FreeLB's
    U(-1, 1)·ε/√(perturbed elements per sample), which lies inside the ball."""
    m = _mask_like(x, mask)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype) * 2 - 1
    if norm == "linf":
        return u * epsilon * m
    count = _per_sample(m).float().sum(dim=1).clamp_min(1).view(-1, *([1] * (x.dim() - 1)))
    return (u * m * (epsilon / count.sqrt())).to(x.dtype)


def project(delta: Tensor, norm: Norm, epsilon: float | Tensor) -> Tensor:
    """Nearest point of the ε-ball."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    scale = (epsilon / _l2(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (delta * scale).to(delta.dtype)


def ascent_direction(grad: Tensor, norm: Norm, mask: Optional[Tensor] = None) -> Tensor:
    """Steepest ascent direction of unit norm: sign for L∞, normalised gradient for L2."""
    g = grad * _mask_like(grad, mask)
    if norm == "linf":
        return g.sign()
    return (g / _l2(g).clamp_min(_TINY)).to(grad.dtype)


def clip_to_range(x: Tensor, delta: Tensor, clip_range: Optional[tuple[float, float]]) -> Tensor:
    """Shrink δ so that x+δ stays inside [lo, hi]."""
    if clip_range is None:
        return delta
    lo, hi = clip_range
    return (x + delta).clamp(lo, hi) - x


def random_wrong_labels(labels: Tensor, num_classes: int, generator: torch.Generator,
                        ignore_index: int = -100) -> Tensor:
    """(label + U{1..C-1}) mod C per entry, the official code's target; ignored entries stay."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    target = (labels + shift) % num_classes
    return torch.where(labels == ignore_index, labels, target)


def per_element_scale(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """√(perturbed elements) per sample, shaped for broadcasting: turns an RMS-per-element L2
    radius or step into the sample's total (ε·√(L·d) for L real tokens of width d)."""
    return _per_sample(_mask_like(x, mask)).float().sum(dim=1).clamp_min(1).sqrt().view(-1, *([1] * (x.dim() - 1)))


def pgd(objective: Callable[[Tensor], Tensor], x: Tensor, *, norm: Norm, epsilon: float, step_size: float,
        steps: int, start_random: bool, generator: torch.Generator, mask: Optional[Tensor] = None,
        clip_range: Optional[tuple[float, float]] = None, per_element: bool = False) -> Tensor:
    """Projected gradient ascent on `objective(δ)` (a scalar) around `x`; returns a detached δ.

    Every iterate stays in the ε-ball, inside `clip_range` (for x+δ) and zero where `mask` is 0.
    With `per_element`, an L2 ε and step bound δ's root mean square over the perturbed elements
    (the ball's radius grows as √(elements)); L∞ is per element anyway.
    Only the input gradient is taken (`torch.autograd.grad`), so parameter gradients are untouched.
    """
    x = x.detach()
    m = _mask_like(x, mask)
    if per_element and norm == "l2":
        scale = per_element_scale(x, mask)
        epsilon, step_size = epsilon * scale, step_size * scale
    if start_random:
        delta = random_start(x, norm, epsilon, generator, mask)
    else:
        delta = torch.zeros_like(x)
    delta = clip_to_range(x, project(delta, norm, epsilon), clip_range) * m
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(delta), delta)
        with torch.no_grad():
            delta = delta + step_size * ascent_direction(grad, norm, mask)
            delta = clip_to_range(x, project(delta, norm, epsilon), clip_range) * m
    return delta.detach()
