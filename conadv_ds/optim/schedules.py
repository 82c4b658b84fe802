"""Learning-rate schedules the paper needs and DeepSpeed lacks."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler


def warmup_poly(step: int, peak: float, warmup_steps: int, total_steps: int, warmup_min: float = 0.0,
                power: float = 1.0, end: float = 0.0) -> float:
    """Linear warmup from `warmup_min` to `peak` over `warmup_steps`, then polynomial decay with
    `power` to `end` at `total_steps` (and `end` after)."""
    if step < warmup_steps:
        return warmup_min + (peak - warmup_min) * step / warmup_steps
    if step >= total_steps:
        return end
    frac = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return end + (peak - end) * (1.0 - frac) ** power


class WarmupPolyDecay(LRScheduler):
    """`warmup_poly` per parameter group, the group's initial lr as the peak (LARS/LAMB recipes
    of the ConAdv and LAMB papers: power 1.6 for ResNet-50, 1 for BERT). Step it once per
    optimizer step (DeepSpeed does when it is passed as `lr_scheduler`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_num_steps: int, total_num_steps: int,
                 warmup_min_lr: float = 0.0, power: float = 1.0, end_lr: float = 0.0, last_epoch: int = -1):
        self.warmup_num_steps, self.total_num_steps = warmup_num_steps, total_num_steps
        self.warmup_min_lr, self.power, self.end_lr = warmup_min_lr, power, end_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [warmup_poly(self.last_epoch, base, self.warmup_num_steps, self.total_num_steps, self.warmup_min_lr,
                            self.power, self.end_lr) for base in self.base_lrs]
