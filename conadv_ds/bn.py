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
- `fp32_batchnorm` makes every BatchNorm normalise in fp32 with fp32 running statistics under
  bf16/fp16 training, as the official code does: a half-precision running variance updated by
  momentum 0.1 loses most of each update.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
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


class _Fp32BatchNormMixin:
    """`_BatchNorm.forward` computed in fp32 (input, affine parameters, running statistics kept in
    fp32); the output in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        out = F.batch_norm(x.float(), self.running_mean if not self.training or self.track_running_stats else None,
                           self.running_var if not self.training or self.track_running_stats else None,
                           None if self.weight is None else self.weight.float(),
                           None if self.bias is None else self.bias.float(), batch_stats, momentum, self.eps)
        return out.to(x.dtype)


_FP32_TYPES: dict[type, type] = {}


def _fp32_type(bn_type: type) -> type:
    if bn_type not in _FP32_TYPES:
        _FP32_TYPES[bn_type] = type(f"Fp32{bn_type.__name__}", (_Fp32BatchNormMixin, bn_type), {})
    return _FP32_TYPES[bn_type]


def fp32_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm of `module` (auxiliary branches included) compute in fp32, in place.
    Call before `initialize`; its running statistics then stay fp32 (leave DeepSpeed's
    `data_types.buffer_dtype` unset)."""
    for m in module.modules():
        if isinstance(m, nn.SyncBatchNorm):
            raise ValueError(f"fp32_batchnorm: {type(m).__name__} is not supported (its forward synchronizes "
                             "statistics across ranks); use BatchNorm layers")
        if not isinstance(m, _BatchNorm):
            continue
        if not isinstance(m, _Fp32BatchNormMixin):
            aux = isinstance(m, _AuxBatchNormMixin)
            plain = _fp32_type(type(m).__bases__[1] if aux else type(m))
            m.__class__ = _aux_type(plain) if aux else plain
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(m, name, b.float())
    return module


def is_fp32_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, _Fp32BatchNormMixin)
