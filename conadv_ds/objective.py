"""THE ConAdv micro-step: the loss (1-λ)·L(x) + λ·L(x+δ) of one micro-batch and its statistics.

Every front end calls `Objective.__call__` once per micro-batch with its host's own way of
turning a batch into a loss (`Forward`: the engine's `loss_fn`, the Trainer's `compute_loss`
with its label smoothing and `num_items_in_batch`, accelerate's model call), so that the clean
and the adversarial halves go through the same loss path, and with δ = 0 the step is the
host's own. Statistics stay on the device (`StepMetrics`) and are read once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import batch as B
from .bn import adversarial_branch, bn_branch, has_aux_bn
from .perturb import Space
from .reduce import all_reduce_sum, world_size

Forward = Callable[[B.Batch], tuple[Tensor, Any]]
"""forward(batch) -> (loss, model output), the host's loss path for one batch."""


@dataclass(frozen=True)
class MicroStats:
    """One micro-batch's statistics, detached, on the device."""

    loss: Tensor
    clean_loss: Optional[Tensor]
    adv_loss: Optional[Tensor]
    correct: Tensor
    counted: Tensor
    adv_correct: Tensor
    adv_counted: Tensor


@dataclass(frozen=True)
class MicroStep:
    loss: Tensor
    """What to backpropagate (one backward per micro-batch)."""
    stats: MicroStats


class Objective:
    """The λ-mixed loss of a run: `space` says how δ enters the batch; with `aux_bn` the
    adversarial forward runs through the auxiliary BatchNorm branch of `module`."""

    def __init__(self, space: Optional[Space], adv_weight: float, module: Optional[nn.Module] = None,
                 aux_bn: bool = False):
        self.space, self.adv_weight, self.module, self.aux_bn = space, adv_weight, module, aux_bn
        self.causal = B.is_causal_lm(module)
        self.views_apart = module is not None and aux_bn and has_aux_bn(module, "aa")
        """ConAdv+AA with three BatchNorm branches: the AutoAugment block gets its own forward
        through the "aa" branch (otherwise the clean and AutoAugment blocks share one forward)."""

    def __call__(self, forward: Forward, batch: B.Batch, delta: Optional[Tensor]) -> MicroStep:
        lam = self.adv_weight
        clean = adv = None
        if delta is None or lam < 1:
            clean, correct, counted = self._clean(forward, batch)
        if delta is not None:
            part = self.space.adversarial_part(batch)
            with adversarial_branch(self.module, self.aux_bn and self.module is not None):
                adv, out = forward(self.space.perturbed(part, delta))
            adv_correct, adv_counted = B.correct(out, part, self.causal)
            del out
        if clean is None:
            loss = adv
        elif adv is None:
            loss = clean
        else:
            loss = (1 - lam) * clean + lam * adv
        zero = torch.zeros((), dtype=torch.int64, device=loss.device)
        if clean is None:
            correct = counted = zero
        if adv is None:
            adv_correct = adv_counted = zero
        stats = MicroStats(loss=loss.detach(), clean_loss=None if clean is None else clean.detach(),
                           adv_loss=None if adv is None else adv.detach(), correct=correct, counted=counted,
                           adv_correct=adv_correct, adv_counted=adv_counted)
        return MicroStep(loss, stats)


    def _clean(self, forward: Forward, batch: B.Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The clean part's loss and counts: one forward, or one per view (clean through the main
        BatchNorm, AutoAugment through its branch), each view weighted equally."""
        views = self.space.views(batch) if self.views_apart else [batch]
        losses, correct, counted = [], 0, 0
        for i, view in enumerate(views):
            with bn_branch(self.module, "main" if i == 0 else "aa"):
                loss, out = forward(view)
            c, n = B.correct(out, view, self.causal)
            losses.append(loss)
            correct, counted = correct + c, counted + n
            del out
        return sum(losses) / len(losses), correct, counted


_FIELDS = ("loss", "clean_loss", "adv_loss", "correct", "counted", "adv_correct", "adv_counted")


class StepMetrics:
    """Micro-batch statistics summed on the device; `read` reduces them over ranks with one
    collective and reads them with one host sync."""

    def __init__(self) -> None:
        self.sums: Optional[Tensor] = None
        self.micro = 0
        self.has_clean = self.has_adv = False

    def add(self, s: MicroStats) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=s.loss.device)
        row = torch.stack([zero if v is None else v.to(torch.float64) for v in (getattr(s, f) for f in _FIELDS)])
        self.sums = row if self.sums is None else self.sums + row
        self.micro += 1
        self.has_clean |= s.clean_loss is not None
        self.has_adv |= s.adv_loss is not None

    def read(self, group=None) -> dict[str, float]:
        """Losses averaged over micro-batches and ranks, accuracies over every counted label; resets."""
        if self.sums is None:
            return {}
        n = self.micro * world_size(group)
        # the step's one host read (it waits for the device): every statistic in one tensor
        v = dict(zip(_FIELDS, all_reduce_sum(self.sums, group).tolist()))
        m = {"loss": v["loss"] / n}
        if self.has_clean:
            m["clean_loss"] = v["clean_loss"] / n
        if self.has_adv:
            m["adv_loss"] = v["adv_loss"] / n
        if v["counted"] > 0:
            m["accuracy"] = v["correct"] / v["counted"]
        if v["adv_counted"] > 0:
            m["adv_accuracy"] = v["adv_correct"] / v["adv_counted"]
        self.__init__()
        return m
