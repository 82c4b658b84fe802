"""BatchNorm handling for adversarial (and AutoAugment) samples.

- `convert_aux_bn` gives every BatchNorm auxiliary copies: `aux` for adversarial samples
  (AdvProp; the official code's `mixbn`) and, with `augmented=True`, `aux_aa` for AutoAugment
  views (the official ConAdv+AA batch has three branches: main / AA / adversarial). The main
  branch keeps its state-dict keys; evaluation always uses it.
- `bn_branch` routes every BatchNorm through one branch inside a block. Each forward normalises
  its own samples with its own branch's batch statistics and updates that branch's running
  statistics only, as the official code's split of one concatenated batch does.
- `attack_bn_mode` fixes the BatchNorm mode of the attack forward and guarantees that the
  attack never changes running statistics.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Branch = Literal["main", "adv", "aa"]
_ATTR = {"adv": "aux", "aa": "aux_aa"}


class _AuxBatchNormMixin:
    """Forward through the auxiliary copy named by `self.route` ("main": this layer itself)."""

    route: Branch = "main"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route != "main":
            return getattr(self, _ATTR[self.route])(x)
        return super().forward(x)


_AUX_TYPES: dict[type, type] = {}


def _aux_type(bn_type: type) -> type:
    if bn_type not in _AUX_TYPES:
        _AUX_TYPES[bn_type] = type(f"Aux{bn_type.__name__}", (_AuxBatchNormMixin, bn_type), {})
    return _AUX_TYPES[bn_type]


def convert_aux_bn(module: nn.Module, augmented: bool = False) -> nn.Module:
    """Add auxiliary branches to every BatchNorm of `module`, in place: `aux` (adversarial) and,
    with `augmented`, `aux_aa` (AutoAugment views).

    The branches start from the same affine parameters and statistics. Call before handing the
    model to `initialize` (or to an optimizer) so the optimizer sees the auxiliary parameters.
    """
    for child in module.children():
        if isinstance(child, _BatchNorm):
            if not isinstance(child, _AuxBatchNormMixin):
                fresh = copy.deepcopy(child)
                child.__class__ = _aux_type(type(fresh))
                child.aux = fresh
            if augmented and not hasattr(child, "aux_aa"):
                child.aux_aa = copy.deepcopy(child.aux)
        else:
            convert_aux_bn(child, augmented)
    return module


def has_aux_bn(module: nn.Module, branch: Branch = "adv") -> bool:
    return any(isinstance(m, _AuxBatchNormMixin) and hasattr(m, _ATTR[branch]) for m in module.modules())


@contextmanager
def bn_branch(module: Optional[nn.Module], branch: Branch) -> Iterator[None]:
    """Route BatchNorm through `branch` inside the block (no-op for layers without that branch)."""
    layers = [] if module is None or branch == "main" else \
        [m for m in module.modules() if isinstance(m, _AuxBatchNormMixin) and hasattr(m, _ATTR[branch])]
    for m in layers:
        m.route = branch
    try:
        yield
    finally:
        for m in layers:
            m.route = "main"


def adversarial_branch(module: Optional[nn.Module], enabled: bool = True):
    """`bn_branch(module, "adv")` when enabled, else the main branch."""
    return bn_branch(module, "adv" if enabled else "main")


@contextmanager
def attack_bn_mode(module: nn.Module, mode: Literal["eval", "train"]) -> Iterator[None]:
    """BatchNorm layers in `mode` inside the block; running statistics restored on exit."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.training, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
             for m in layers]
    for m in layers:
        m.train(mode == "train")
    try:
        yield
    finally:
        for m, (training, buffers) in zip(layers, saved):
            m.training = training
            for k, b in buffers.items():
                getattr(m, k).copy_(b)
