"""Optimizers and LR schedules built by conadv_ds from the DeepSpeed JSON.

This version hands every optimizer and scheduler block to DeepSpeed unchanged.
"""

from __future__ import annotations

import copy


def prepare_ds_config(ds_config: dict, world_size: int) -> tuple[dict, None, None]:
    """(config for DeepSpeed, our optimizer spec, our scheduler spec)."""
    return copy.deepcopy(ds_config), None, None


def build_optimizer(spec: dict, model):
    raise ValueError(f"optimizer type {spec.get('type')!r} is not built by conadv_ds in this version")


def build_scheduler(spec: dict, optimizer):
    raise ValueError(f"scheduler type {spec.get('type')!r} is not built by conadv_ds in this version")


def bind_to_engine(engine) -> None:
    """Nothing to bind for DeepSpeed's own optimizers."""
