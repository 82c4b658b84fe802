"""The two batch shapes the engine accepts and how a model is called on each.

- `(inputs, targets)` tuples: `model(inputs)` returns logits; default loss cross-entropy.
- dicts (Hugging Face style): `model(**batch)` returns an output with `.loss` and `.logits`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""A label that is not counted (PyTorch's `cross_entropy` default, transformers' MLM padding)."""

Batch = Any
LossFn = Callable[[Any, Batch], Tensor]
"""loss_fn(model_output, batch) -> scalar loss."""


def is_dict(batch: Batch) -> bool:
    return isinstance(batch, Mapping)  # dicts, and transformers' BatchEncoding


def check(batch: Batch) -> None:
    if is_dict(batch):
        return
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return
    raise TypeError(f"batch of type {type(batch).__name__}: expected an (inputs, targets) pair or a dict of tensors")


def to_device(batch: Batch, device: torch.device, float_dtype: Optional[torch.dtype] = None) -> Batch:
    """Move every tensor to `device`; floating ones are then cast to `float_dtype` when given, on
    the device (a move and a cast in one call would make a host-side copy of a pinned,
    channels-last batch first)."""
    if isinstance(batch, Tensor):
        moved = batch.to(device=device, non_blocking=True)
        return moved.to(float_dtype) if float_dtype is not None and batch.is_floating_point() else moved
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, float_dtype) for v in batch)
    return batch


def call(model: Callable, batch: Batch, **override: Tensor) -> Any:
    """Run `model` on `batch`, replacing named inputs (`inputs` for a tuple batch)."""
    if is_dict(batch):
        return model(**{**batch, **override})
    return model(override.get("inputs", batch[0]))


def labels(batch: Batch) -> Optional[Tensor]:
    return batch.get("labels") if is_dict(batch) else batch[1]


def logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def default_loss(output: Any, batch: Batch) -> Tensor:
    """Cross-entropy for tuple batches; the model's own `.loss` for dict batches."""
    if is_dict(batch):
        if getattr(output, "loss", None) is None:
            raise ValueError("model output has no .loss: pass labels in the batch or a loss_fn")
        return output.loss
    return F.cross_entropy(output, batch[1])


def is_causal_lm(module: Any) -> bool:
    """Whether `module` is a Hugging Face causal LM, whose logits at t predict the label at t+1."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    get_name = getattr(module, "_get_name", None)
    return callable(get_name) and get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def aligned(out: Tensor, y: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Logits and the labels they predict (shifted by one position for causal LMs)."""
    return (out[..., :-1, :], y[..., 1:]) if causal else (out, y)


def correct(output: Any, batch: Batch, causal: bool = False) -> tuple[Tensor, Tensor]:
    """(correct, counted) top-1 predictions as device tensors (no host sync); positions labelled
    -100 are not counted."""
    y = labels(batch)
    out = logits(output).detach()
    if y is None:
        zero = torch.zeros((), dtype=torch.int64, device=out.device)
        return zero, zero
    out, y = aligned(out, y, causal)
    valid = y != IGNORE_INDEX
    return (out.argmax(dim=-1).eq(y) & valid).sum(), valid.sum()
