"""A reproducibility fingerprint of a model's weights, the same under every ZeRO stage."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of the fp32 parameters in name order. Collective under ZeRO-3 (parameters are
    gathered one at a time), so every rank must call it."""
    import deepspeed

    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        with deepspeed.zero.GatheredParameters([p]):
            h.update(name.encode())
            h.update(p.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
