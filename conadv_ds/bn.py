"""BatchNorm handling for adversarial samples.

- `convert_aux_bn` gives every BatchNorm an auxiliary copy used for adversarial samples
  (AdvProp; the official code's `mixbn`). The main branch keeps its state-dict keys, the
  copy lives under `<name>.aux`; evaluation always uses the main branch.
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


class _AuxBatchNormMixin:
    """Forward through `self.aux` while `self.route_aux` is set."""

    route_aux: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route_aux:
            return self.aux(x)
        return super().forward(x)


_AUX_TYPES: dict[type, type] = {}


def _aux_type(bn_type: type) -> type:
    if bn_type not in _AUX_TYPES:
        _AUX_TYPES[bn_type] = type(f"Aux{bn_type.__name__}", (_AuxBatchNormMixin, bn_type), {})
    return _AUX_TYPES[bn_type]


def convert_aux_bn(module: nn.Module) -> nn.Module:
    """Add an auxiliary (adversarial) branch to every BatchNorm of `module`, in place.

    Both branches start from the same affine parameters and statistics. Call before
    handing the model to `initialize` so the optimizer sees the auxiliary parameters.
    """
    for child in module.children():
        if isinstance(child, _BatchNorm) and not isinstance(child, _AuxBatchNormMixin):
            aux = copy.deepcopy(child)
            child.__class__ = _aux_type(type(child))
            child.aux = aux
        else:
            convert_aux_bn(child)
    return module


def has_aux_bn(module: nn.Module) -> bool:
    return any(isinstance(m, _AuxBatchNormMixin) for m in module.modules())


@contextmanager
def adversarial_branch(module: Optional[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Route BatchNorm through the auxiliary branch inside the block (no-op without aux BN)."""
    layers = [m for m in module.modules() if isinstance(m, _AuxBatchNormMixin)] if enabled and module else []
    for m in layers:
        m.route_aux = enabled
    try:
        yield
    finally:
        for m in layers:
            m.route_aux = False


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
