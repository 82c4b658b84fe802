"""The attack on a model: PGD in a perturbation space with explicit BatchNorm and RNG policy.

Every random draw of the attack (clean-start coin, random start, target labels, dropout in
the attack forward) comes from a stream seeded by (seed, step, micro-batch, rank), so δ for a
batch does not depend on *when* it is computed and the training RNG is never advanced.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor, nn

from . import batch as B
from .attacks import pgd, random_wrong_labels
from .bn import adversarial_branch, attack_bn_mode
from .config import ConAdvConfig
from .perturb import Space, attack_objective


def attack_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A distinct 63-bit seed per (seed, step, micro-batch, rank)."""
    h = seed
    for v in (step, micro, rank):
        h = (h * 1_000_003 + v + 0x9E3779B97F4A7C15) % (1 << 63)
    return h


class Adversary:
    """Computes δ for one micro-batch with whatever weights are currently in the module."""

    def __init__(self, module: nn.Module, space: Space, cfg: ConAdvConfig,
                 loss_fn: B.LossFn, rank: int, autocast: Callable[[], ContextManager] = nullcontext):
        self.module, self.space, self.cfg, self.loss_fn = module, space, cfg, loss_fn
        self.rank, self.autocast = rank, autocast
        self.causal = B.is_causal_lm(module)

    def __call__(self, batch: B.Batch, step: int, micro: int) -> Tensor:
        cfg = self.cfg
        batch = self.space.adversarial_part(batch)
        seed = attack_seed(cfg.seed, step, micro, self.rank)
        device = _device_of(batch)
        start_random = random.Random(seed).random() >= cfg.clean_start_prob  # a host draw: no device sync
        gen = torch.Generator(device=device).manual_seed(seed)
        labels = B.labels(batch)
        target: list[Optional[Tensor]] = [None]

        def objective(delta: Tensor) -> Tensor:
            with self.autocast():
                out = self.space.forward(self.module, batch, delta, origin=x0)
            if cfg.targeted and target[0] is None:
                target[0] = random_wrong_labels(labels, B.logits(out).shape[-1], gen)
            return attack_objective(out, batch, target[0], self.loss_fn, self.causal)

        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), attack_bn_mode(self.module, cfg.attack_bn), \
                adversarial_branch(self.module, cfg.aux_bn):
            torch.manual_seed(seed)
            x0, mask = self.space.origin(self.module, batch)
            return pgd(objective, x0, norm=cfg.norm, epsilon=cfg.epsilon, step_size=cfg.step_size,
                       steps=cfg.steps, start_random=start_random, generator=gen, mask=mask,
                       clip_range=self.space.clip_for(batch), per_element=cfg.epsilon_scale == "per_element")


def _device_of(batch: Any) -> torch.device:
    for v in (batch.values() if B.is_dict(batch) else batch):
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")
