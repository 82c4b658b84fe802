"""Where δ lives: on the pixels a model is fed, or on the output of its word embedding.

A space knows which part of a batch is attacked, how δ enters the model (`perturbed` returns
the batch to run instead), and the valid range of x+δ. `resolve_space` is the one rule that
picks the space and its range from the config and the model.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import batch as B
from .config import ConAdvConfig
from .errors import ConfigError

ClipRange = Union[tuple[float, float], None, Literal["auto"]]
PIXEL_RANGE = (0.0, 1.0)


class _Space:
    input_key: str

    def forward(self, model: Any, batch: B.Batch, delta: Tensor, origin: Optional[Tensor] = None) -> Any:
        """`model` on the perturbed batch."""
        return B.call(model, self.perturbed(batch, delta, origin))

    def delta_shape_key(self, batch: B.Batch) -> Tensor:
        """The input whose shape δ's leading dimensions share (pixels, or token ids)."""
        return batch[self.input_key] if B.is_dict(batch) else batch[0]


class PixelSpace(_Space):
    """δ is added to the model's input tensor as given.

    `clip_range` "auto" clips x+δ to [0, 1] for `(inputs, targets)` batches (recipes feed [0, 1]
    images and normalise inside the model, so ε is in pixel units) and not at all for dict
    batches (Hugging Face image processors hand over normalised `pixel_values`).
    With `parts=k`, each batch is k equal blocks of views of the same images (e.g. clean then
    AutoAugment) and only the first block is attacked, as in the official ConAdv+AA batches.
    """

    def __init__(self, input_key: str = "pixel_values", parts: int = 1, clip_range: ClipRange = "auto"):
        self.input_key, self.parts, self.clip_range = input_key, parts, clip_range

    def bind(self, module: nn.Module) -> "PixelSpace":
        return self

    def clip_for(self, batch: B.Batch) -> Optional[tuple[float, float]]:
        if self.clip_range != "auto":
            return self.clip_range
        return None if B.is_dict(batch) else PIXEL_RANGE

    def check(self, batch: B.Batch) -> None:
        if B.is_dict(batch) and self.input_key not in batch:
            raise ConfigError(f"conadv.space='pixel': the batches have no '{self.input_key}' (keys: "
                              f"{sorted(batch)}); use space 'embedding' for token inputs")

    def adversarial_part(self, batch: B.Batch) -> B.Batch:
        """The samples that get an adversarial copy."""
        return batch if self.parts == 1 else self.views(batch)[0]

    def views(self, batch: B.Batch) -> list[B.Batch]:
        """The `parts` blocks of a batch: the clean images first, then their augmented views."""
        def blocks(t: Tensor) -> Tensor:  # views, no copies
            return rearrange(t, "(view n) ... -> view n ...", view=self.parts)

        if B.is_dict(batch):
            split = {k: blocks(v) for k, v in batch.items()}
            return [{k: v[i] for k, v in split.items()} for i in range(self.parts)]
        return list(zip(*(blocks(t) for t in batch)))

    def origin(self, model: nn.Module, batch: B.Batch) -> tuple[Tensor, Optional[Tensor]]:
        self.check(batch)
        x = batch[self.input_key] if B.is_dict(batch) else batch[0]
        return x.detach(), None

    def perturbed(self, batch: B.Batch, delta: Tensor, origin: Optional[Tensor] = None) -> B.Batch:
        x = origin if origin is not None else (batch[self.input_key] if B.is_dict(batch) else batch[0])
        x = x + delta.to(x.dtype)
        return {**batch, self.input_key: x} if B.is_dict(batch) else (x, batch[1])


class EmbeddingSpace(_Space):
    """δ is added to the word-embedding output and fed through `inputs_embeds`.

    The embedding module is *called* (never read as a tensor), so its weight is gathered under
    ZeRO-3 like in any forward. Positions whose attention mask is 0 are never perturbed.
    `clip_range` "auto" (or None) never clips.
    """

    def __init__(self, embedding: Optional[nn.Module] = None, input_key: str = "input_ids",
                 mask_key: str = "attention_mask", clip_range: ClipRange = "auto"):
        self.embedding = embedding
        self.input_key, self.mask_key, self.clip_range = input_key, mask_key, clip_range

    def bind(self, module: nn.Module) -> "EmbeddingSpace":
        if self.embedding is None:
            emb = input_embedding(module)
            if emb is None:
                raise ConfigError(f"conadv.space='embedding': model {type(module).__name__} has no "
                                  "get_input_embeddings(); use space 'pixel' or pass perturb=EmbeddingSpace(module)")
            self.embedding = emb
        return self

    def clip_for(self, batch: B.Batch) -> Optional[tuple[float, float]]:
        return None if self.clip_range == "auto" else self.clip_range

    def check(self, batch: B.Batch) -> None:
        if not B.is_dict(batch) or self.input_key not in batch:
            keys = sorted(batch) if B.is_dict(batch) else type(batch).__name__
            raise ConfigError(f"conadv.space='embedding': the batches have no '{self.input_key}' ({keys}); "
                              "use space 'pixel'")

    def adversarial_part(self, batch: B.Batch) -> B.Batch:
        return batch

    def _mask(self, batch: B.Batch) -> Optional[Tensor]:
        m = batch.get(self.mask_key)
        return None if m is None else m.unsqueeze(-1)

    def origin(self, model: nn.Module, batch: B.Batch) -> tuple[Tensor, Optional[Tensor]]:
        self.check(batch)
        with torch.no_grad():
            emb = self.embedding(batch[self.input_key])
        return emb.detach(), self._mask(batch)

    def perturbed(self, batch: B.Batch, delta: Tensor, origin: Optional[Tensor] = None) -> B.Batch:
        emb = origin if origin is not None else self.embedding(batch[self.input_key])
        mask = self._mask(batch)
        if mask is not None:
            delta = delta * mask.to(delta.dtype)
        inputs = {k: v for k, v in batch.items() if k != self.input_key}
        return {**inputs, "inputs_embeds": emb + delta.to(emb.dtype)}


Space = Union[PixelSpace, EmbeddingSpace]


def input_embedding(module: nn.Module) -> Optional[nn.Embedding]:
    """The model's word embedding (`get_input_embeddings()` when it is an `nn.Embedding`), else None."""
    get = getattr(module, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:
        return None
    return emb if isinstance(emb, nn.Embedding) else None


def resolve_space(cfg: ConAdvConfig, model: nn.Module, perturb: Optional[Space] = None) -> Space:
    """The perturbation space of a run, bound to `model`: `perturb` when given, else the config's
    `space`, where "auto" means embedding space for models with a word embedding (BERT, GPT-2,
    Llama, ...) and pixel space otherwise. A `clip_range` set in the config wins over the space's own."""
    if perturb is None:
        kind = cfg.space
        if kind == "auto":
            kind = "embedding" if input_embedding(model) is not None else "pixel"
        perturb = EmbeddingSpace() if kind == "embedding" else PixelSpace()
    if cfg.clip_range != "auto":
        perturb.clip_range = None if cfg.clip_range is None else tuple(cfg.clip_range)
    return perturb.bind(model)


def attack_objective(output: Any, batch: B.Batch, target: Optional[Tensor], loss_fn: B.LossFn,
                     causal: bool = False) -> Tensor:
    """What PGD ascends: minus the cross-entropy to `target` (targeted; for causal LMs the
    logits at t are paired with the target at t+1), else the training loss."""
    if target is None:
        return loss_fn(output, batch)
    logits, target = B.aligned(B.logits(output), target, causal)
    return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)
