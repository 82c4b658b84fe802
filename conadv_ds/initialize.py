"""`conadv_ds.initialize`: `deepspeed.initialize` with the `conadv` block, LARS/LAMB and our schedules."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from . import optim
from .batch import LossFn, default_loss
from .bn import convert_aux_bn, has_aux_bn, is_fp32_batchnorm
from .config import half_precision
from .engine import ConAdvEngine
from .errors import ConfigError
from .perturb import Space, resolve_space
from .resolve import RunConfig, resolve_config
from .schedule import build_schedule
from .split.attacker import SplitAttacker


def _check_precision(ds_config: dict, model: nn.Module) -> None:
    """DeepSpeed casts parameters but not buffers to fp16/bf16: a half-precision BatchNorm would
    fail at the first forward with a dtype mismatch unless the buffers are cast too, and an fp32
    one (`bn.fp32_batchnorm`) needs them left in fp32."""
    from torch.nn.modules.batchnorm import _BatchNorm

    mode = half_precision(ds_config)
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if mode is None or not layers:
        return
    buffer_dtype = ds_config.get("data_types", {}).get("buffer_dtype")
    fp32 = all(is_fp32_batchnorm(m) for m in layers)
    if fp32 and buffer_dtype is not None:
        raise ConfigError(f"data_types.buffer_dtype={buffer_dtype!r} with fp32 BatchNorm (conadv_ds.bn."
                          "fp32_batchnorm): its running statistics stay fp32; remove buffer_dtype")
    if not fp32 and buffer_dtype is None:
        raise ConfigError(f"{mode}.enabled=true with BatchNorm layers in the model: DeepSpeed keeps buffers "
                          "in fp32; call conadv_ds.bn.fp32_batchnorm(model) before initialize (BatchNorm in "
                          f"fp32, as the official code), or set \"data_types\": {{\"buffer_dtype\": \"{mode}\"}}")


def initialize(args: Any = None, model: Optional[nn.Module] = None, model_parameters: Any = None,
               training_data: Any = None, config: Union[str, Path, dict, RunConfig, None] = None,
               loss_fn: Optional[LossFn] = None, perturb: Optional[Space] = None,
               optimizer: Any = None, lr_scheduler: Any = None, conadv: Optional[dict] = None,
               **kwargs: Any) -> tuple[Union[ConAdvEngine, SplitAttacker], Any, Any, Any]:
    """Like `deepspeed.initialize`, returning `(engine, optimizer, dataloader, lr_scheduler)`.

    `config` is a DeepSpeed JSON path or dict (or `args.deepspeed_config`, or a `RunConfig`
    already resolved by `resolve_config`); its `"conadv"` block
    (overridden by `conadv`, e.g. from CLI flags) is validated, together with the batch
    arithmetic, before DeepSpeed starts, and is not passed on. Optimizer types LARS and LAMB
    and scheduler type WarmupPolyDecay are built here; DeepSpeed's own types are DeepSpeed's.
    `loss_fn(output, batch)` replaces the default loss; `perturb` the perturbation space.
    With schedule 'split', DeepSpeed's world is the trainer ranks, and an attacker rank gets
    `(SplitAttacker, None, None, None)` (see `conadv_ds.split`).
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
    if isinstance(config, RunConfig):
        if conadv:
            raise ValueError("initialize(): conadv= overrides go into resolve_config(), not beside a RunConfig")
        run = config
    else:
        run = resolve_config(config, conadv)
    cfg, ds_config = run.conadv, run.ds
    _check_precision(ds_config, model)
    space = resolve_space(cfg, model, perturb) if cfg.adversarial else None
    augmented = getattr(space, "parts", 1) > 1
    if cfg.adversarial and cfg.aux_bn and not (has_aux_bn(model) and (has_aux_bn(model, "aa") or not augmented)):
        if optimizer is not None or model_parameters is not None:
            raise ConfigError("conadv.aux_bn=true: the auxiliary BatchNorm parameters are added to the model by "
                              "initialize; pass no optimizer= or model_parameters= built before, or call "
                              "conadv_ds.bn.convert_aux_bn(model) before building them")
        convert_aux_bn(model, augmented=augmented)
    if run.layout is not None:
        from .split.link import connect

        if connect(run.layout).is_attacker:
            return SplitAttacker(model, space, cfg, ds_config, loss_fn), None, None, None
    if run.optimizer is not None and optimizer is None:
        optimizer = optim.build_optimizer(run.optimizer, model)
    if run.scheduler is not None and lr_scheduler is None:
        lr_scheduler = optim.build_scheduler(run.scheduler, optimizer)

    import deepspeed

    if model_parameters is None and optimizer is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, ds_opt, loader, sched = deepspeed.initialize(
        args=args, model=model, model_parameters=model_parameters, training_data=training_data,
        config=ds_config, optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)
    optim.bind_to_engine(engine)
    from deepspeed.runtime.torch_autocast import autocast_if_enabled

    schedule = build_schedule(cfg, space, engine, engine.module, loss_fn or default_loss, rank=engine.global_rank,
                              autocast=lambda: autocast_if_enabled(engine))
    wrapped = ConAdvEngine(engine, cfg, schedule, space, loss_fn=loss_fn)
    if engine.global_rank == 0:
        print("conadv config: " + json.dumps(cfg.model_dump(), sort_keys=True), flush=True)
    return wrapped, ds_opt, loader, sched
