"""The configuration of a run, resolved once: what `initialize`, `conadv-validate` and every
recipe's `--dry_run` act on.

A DeepSpeed JSON (path or dict) plus `--conadv` overrides and the launch size become the
DeepSpeed dict without our blocks, the `ConAdvConfig`, the batch plan, the split layout and
the specs of the optimizer and scheduler that conadv_ds builds (LARS, LAMB, WarmupPolyDecay).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from . import optim
from .config import (
    CONADV_KEY,
    ConAdvConfig,
    check_deepspeed,
    check_finite,
    load_json,
    parse_conadv,
    without_timer_syncs,
)
from .errors import ConfigError
from .split.layout import Layout, plan_layout
from .stale import check_zero_support


@dataclass(frozen=True)
class BatchPlan:
    """DeepSpeed's rule train_batch_size = micro × accumulation × world size, resolved."""

    train_batch_size: int
    micro_batch_per_rank: int
    gradient_accumulation_steps: int
    world_size: int
    """Ranks that train (with schedule 'split': the trainer ranks only)."""


@dataclass(frozen=True)
class RunConfig:
    ds: dict
    """What DeepSpeed gets: no conadv block; our optimizer, scheduler and lr_scaling removed;
    the throughput timer off unless configured (`config.without_timer_syncs`)."""
    conadv: ConAdvConfig
    batch: BatchPlan
    layout: Optional[Layout]
    """The split layout (schedule 'split'), else None."""
    optimizer: Optional[dict]
    """The LARS/LAMB block conadv_ds builds (learning rate scaled), else None."""
    scheduler: Optional[dict]
    """The WarmupPolyDecay block conadv_ds builds, else None."""
    launch_size: int
    """Ranks started, attackers included."""


def launch_world_size() -> int:
    """This launch's world size, known before any process group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


MAX_MICRO_KEY = "max_train_micro_batch_size_per_gpu"


def _micro_batch_plan(raw: dict, world: int) -> dict:
    """`max_train_micro_batch_size_per_gpu` (ours, removed here): with train_batch_size and no
    micro-batch, the largest per-rank micro-batch up to that many samples that divides the
    per-rank batch (BatchNorm statistics and memory), gradient accumulation making up the rest."""
    limit = raw.pop(MAX_MICRO_KEY, None)
    if limit is None:
        return {}
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{MAX_MICRO_KEY}={limit!r}: must be a positive integer")
    tb = raw.get("train_batch_size")
    if "train_micro_batch_size_per_gpu" in raw or "gradient_accumulation_steps" in raw:
        raise ConfigError(f"{MAX_MICRO_KEY}={limit}: set it instead of train_micro_batch_size_per_gpu and "
                          "gradient_accumulation_steps, not with them")
    if not isinstance(tb, int) or isinstance(tb, bool) or tb < 1 or tb % world:
        return {}  # check_deepspeed names the problem
    per_rank = tb // world
    micro = max(m for m in range(1, min(limit, per_rank) + 1) if per_rank % m == 0)
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": per_rank // micro}


def resolve_config(config: Union[str, Path, dict], overrides: Optional[dict] = None,
                   launch_size: Optional[int] = None, defaults: Optional[dict] = None) -> RunConfig:
    """Validate everything that needs no model or data, once; one-line `ConfigError`s.

    `overrides` replace fields of the `conadv` block (CLI flags, a Trainer argument);
    `defaults` fill fields that neither sets (a recipe's own defaults, e.g. AutoAugment's
    adv_weight) and do not switch ConAdv on by themselves; `launch_size` defaults to this launch's world size."""
    raw = load_json(config)
    check_finite(raw)
    block = raw.pop(CONADV_KEY, None)
    if block is not None and not isinstance(block, dict):
        parse_conadv(block)  # the one-line error for a block that is not an object
    if block is not None or overrides:  # defaults alone do not switch ConAdv on
        block = {**(defaults or {}), **(block or {}), **(overrides or {})}
    conadv = parse_conadv(block)
    split = conadv.adversarial and conadv.schedule == "split"
    if launch_size is None:
        from .split.link import launch_size as split_launch_size

        launch_size = split_launch_size() if split else launch_world_size()
    if launch_size < 1:
        raise ConfigError(f"world size {launch_size}: must be >= 1")
    layout = plan_layout(conadv, raw, launch_size)
    world = len(layout.trainers) if layout is not None else launch_size
    raw.update(_micro_batch_plan(raw, world))
    try:
        tb, micro, gas = check_deepspeed(raw, world)
    except ConfigError as e:
        if layout is None:
            raise
        raise ConfigError(f"{e} (schedule 'split': the world size is the {world} trainer ranks of "
                          f"{launch_size})") from None
    check_zero_support(conadv, raw)
    ds, opt_spec, sched_spec = optim.prepare_ds_config(raw, world)
    return RunConfig(ds=without_timer_syncs(ds), conadv=conadv, batch=BatchPlan(tb, micro, gas, world), layout=layout,
                     optimizer=opt_spec, scheduler=sched_spec, launch_size=launch_size)
