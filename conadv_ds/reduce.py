"""The package's one reduction across ranks (statistics, LARS/LAMB per-layer norms): tensors
handed to the collective live on the accelerator device (NCCL takes no CPU tensors)."""

from __future__ import annotations

import torch
from torch import Tensor


def collective_device() -> torch.device:
    """The device this rank's collectives run on: the accelerator's current device."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce_sum(t: Tensor, group=None) -> Tensor:
    """`t` summed over the ranks of `group` (the default group when None), returned on the
    collective device; unchanged (but moved) when torch.distributed is not running."""
    import torch.distributed as dist

    t = t.to(collective_device())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def all_reduce_sum_(t: Tensor, group=None) -> Tensor:
    """`t` summed over `group` in place. A tensor elsewhere than the collective device (ZeRO-Offload
    keeps optimizer state on the CPU) is copied there for the collective and back."""
    reduced = all_reduce_sum(t, group)
    return t if reduced is t else t.copy_(reduced)


def world_size(group=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
