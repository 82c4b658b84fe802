"""`conadv_ds.initialize`: `deepspeed.initialize` with the `conadv` block, LARS/LAMB and our schedules."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from . import optim, split
from .batch import LossFn
from .bn import convert_aux_bn, has_aux_bn
from .config import split_config, with_overrides
from .engine import ConAdvEngine
from .errors import ConfigError
from .perturb import EmbeddingSpace, PixelSpace, make_space


def world_size() -> int:
    """The launch's world size, known before any process group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_precision(ds_config: dict, model: nn.Module) -> None:
    """DeepSpeed casts parameters but not buffers to fp16/bf16, so BatchNorm would fail at the first
    forward with a dtype mismatch unless the buffers are cast too."""
    from torch.nn.modules.batchnorm import _BatchNorm

    for mode in ("bf16", "fp16"):
        if ds_config.get(mode, {}).get("enabled") is True and any(isinstance(m, _BatchNorm) for m in model.modules()):
            buffer_dtype = ds_config.get("data_types", {}).get("buffer_dtype")
            if buffer_dtype is None:
                raise ConfigError(f"{mode}.enabled=true with BatchNorm layers in the model: DeepSpeed keeps buffers "
                                  f"in fp32; set \"data_types\": {{\"buffer_dtype\": \"{mode}\"}}")


def initialize(args: Any = None, model: Optional[nn.Module] = None, model_parameters: Any = None,
               training_data: Any = None, config: Union[str, Path, dict, None] = None,
               loss_fn: Optional[LossFn] = None, perturb: Optional[Union[PixelSpace, EmbeddingSpace]] = None,
               optimizer: Any = None, lr_scheduler: Any = None, conadv: Optional[dict] = None,
               **kwargs: Any) -> tuple[Union[ConAdvEngine, split.SplitAttacker], Any, Any, Any]:
    """Like `deepspeed.initialize`, returning `(engine, optimizer, dataloader, lr_scheduler)`.

    `config` is a DeepSpeed JSON path or dict (or `args.deepspeed_config`); its `"conadv"` block
    (overridden by `conadv`, e.g. from CLI flags) is validated, together with the batch
    arithmetic, before DeepSpeed starts, and is not passed on. Optimizer types LARS and LAMB
    and scheduler type WarmupPolyDecay are built here; DeepSpeed's own types are DeepSpeed's.
    `loss_fn(output, batch)` replaces the default loss; `perturb` the perturbation space.
    With schedule 'split', DeepSpeed's world is the trainer ranks, and an attacker rank gets
    `(SplitAttacker, None, None, None)` (see `split.py`).
    """
    if model is None:
        raise ValueError("initialize() needs a model")
    if config is None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
    if config is None:
        raise ValueError("initialize() needs config= (a DeepSpeed JSON path or dict) or args.deepspeed_config")
    if args is not None and getattr(args, "deepspeed_config", None):
        args = copy.copy(args)
        args.deepspeed_config = None
    layout = split.plan(config, conadv)
    ws = world_size() if layout is None else len(layout.trainers)
    ds_config, cfg = split_config(config, ws)
    cfg = with_overrides(cfg, conadv)
    _check_precision(ds_config, model)
    space = (perturb or make_space(cfg.space)).bind(model) if cfg.adversarial else perturb
    if cfg.adversarial and cfg.aux_bn and not has_aux_bn(model):
        convert_aux_bn(model)
    if layout is not None and split.connect(layout).is_attacker:
        return split.SplitAttacker(model, space, cfg, ds_config, loss_fn), None, None, None
    ds_config, opt_spec, sched_spec = optim.prepare_ds_config(ds_config, ws)
    if opt_spec is not None and optimizer is None:
        optimizer = optim.build_optimizer(opt_spec, model)
    if sched_spec is not None and lr_scheduler is None:
        lr_scheduler = optim.build_scheduler(sched_spec, optimizer)

    import deepspeed

    if model_parameters is None and optimizer is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, ds_opt, loader, sched = deepspeed.initialize(
        args=args, model=model, model_parameters=model_parameters, training_data=training_data,
        config=ds_config, optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)
    optim.bind_to_engine(engine)
    wrapped = ConAdvEngine(engine, cfg, loss_fn=loss_fn, perturb=space)
    if engine.global_rank == 0:
        print("conadv config: " + json.dumps(cfg.model_dump(), sort_keys=True), flush=True)
    return wrapped, ds_opt, loader, sched
