"""Where δ lives: on the pixels a model is fed, or on the output of its word embedding."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import batch as B
from .errors import ConfigError


class PixelSpace:
    """δ is added to the model's input tensor as given (recipes feed [0, 1] images and
    normalise inside the model, so ε and `clip_range` are in pixel units).

    With `parts=k`, each batch is k equal blocks of views of the same images (e.g. clean then
    AutoAugment) and only the first block is attacked, as in the official ConAdv+AA batches.
    """

    def __init__(self, input_key: str = "pixel_values", parts: int = 1):
        self.input_key, self.parts = input_key, parts

    def bind(self, module: nn.Module) -> "PixelSpace":
        return self

    def adversarial_part(self, batch: B.Batch) -> B.Batch:
        """The samples that get an adversarial copy."""
        if self.parts == 1:
            return batch
        if B.is_dict(batch):
            n = len(batch[self.input_key]) // self.parts
            return {k: v[:n] for k, v in batch.items()}
        n = len(batch[0]) // self.parts
        return batch[0][:n], batch[1][:n]

    def _key(self, batch: B.Batch) -> str:
        return self.input_key if B.is_dict(batch) else "inputs"

    def origin(self, model: nn.Module, batch: B.Batch) -> tuple[Tensor, Optional[Tensor]]:
        x = batch[self.input_key] if B.is_dict(batch) else batch[0]
        return x.detach(), None

    def forward(self, model: Any, batch: B.Batch, delta: Tensor, origin: Optional[Tensor] = None) -> Any:
        x = origin if origin is not None else self.origin(model, batch)[0]
        return B.call(model, batch, **{self._key(batch): x + delta.to(x.dtype)})


class EmbeddingSpace:
    """δ is added to the word-embedding output and fed through `inputs_embeds`.

    The embedding module is *called* (never read as a tensor), so its weight is gathered under
    ZeRO-3 like in any forward. Positions whose attention mask is 0 are never perturbed.
    """

    def __init__(self, embedding: Optional[nn.Module] = None, input_key: str = "input_ids",
                 mask_key: str = "attention_mask"):
        self.embedding = embedding
        self.input_key, self.mask_key = input_key, mask_key

    def bind(self, module: nn.Module) -> "EmbeddingSpace":
        if self.embedding is None:
            get = getattr(module, "get_input_embeddings", None)
            emb = get() if callable(get) else None
            if not isinstance(emb, nn.Module):
                raise ConfigError(f"conadv.space='embedding': model {type(module).__name__} has no "
                                  "get_input_embeddings(); use space 'pixel' or pass perturb=EmbeddingSpace(module)")
            self.embedding = emb
        return self

    def adversarial_part(self, batch: B.Batch) -> B.Batch:
        return batch

    def _mask(self, batch: B.Batch) -> Optional[Tensor]:
        m = batch.get(self.mask_key)
        return None if m is None else m.unsqueeze(-1)

    def origin(self, model: nn.Module, batch: B.Batch) -> tuple[Tensor, Optional[Tensor]]:
        if not B.is_dict(batch) or self.input_key not in batch:
            raise ValueError(f"embedding space needs dict batches with '{self.input_key}'")
        with torch.no_grad():
            emb = self.embedding(batch[self.input_key])
        return emb.detach(), self._mask(batch)

    def forward(self, model: Any, batch: B.Batch, delta: Tensor, origin: Optional[Tensor] = None) -> Any:
        emb = origin if origin is not None else self.embedding(batch[self.input_key])
        mask = self._mask(batch)
        if mask is not None:
            delta = delta * mask.to(delta.dtype)
        inputs = {k: v for k, v in batch.items() if k != self.input_key}
        return B.call(model, inputs, inputs_embeds=emb + delta.to(emb.dtype))


def make_space(space: str) -> PixelSpace | EmbeddingSpace:
    return EmbeddingSpace() if space == "embedding" else PixelSpace()


def attack_objective(output: Any, batch: B.Batch, target: Optional[Tensor], loss_fn: B.LossFn) -> Tensor:
    """What PGD ascends: minus the cross-entropy to `target` (targeted), else the training loss."""
    if target is None:
        return loss_fn(output, batch)
    logits = B.logits(output)
    return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)
