"""The optimizer and scheduler factory: our blocks of the DeepSpeed JSON, validated and built.

`prepare_ds_config` takes out what DeepSpeed must not see (our optimizer and scheduler blocks,
`lr_scaling`), `build_optimizer` / `build_scheduler` build ours from the specs, `bind_to_engine`
gives LARS/LAMB the ZeRO layout once the engine exists. The optimizer blocks are checked against
the optimizers' own argument rules (`LARS.ARGUMENTS`, `LAMB.check_arguments`): a bound lives in
one place, and a JSON error names the config field (`optimizer.params.lr=-1: must be > 0`).
"""

from __future__ import annotations

import copy
import math
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..config import JsonBlock, resolve_batch, validate_block
from ..errors import ConfigError, FieldError, did_you_mean
from .layerwise import FRACTION_PAIR, LAMB, LARS, ArgumentError, broken_rule, param_groups
from .schedules import WarmupPolyDecay
from .zero_layout import layouts_for

__all__ = ["prepare_ds_config", "build_optimizer", "build_scheduler", "bind_to_engine"]


class _OptimizerParams(JsonBlock):
    """An optimizer's `params` block: the fields and defaults here, the bounds the optimizer's."""

    optimizer: ClassVar[type]

    @field_validator("*")
    @classmethod
    def _in_range(cls, v: Any, info: ValidationInfo) -> Any:
        rule = cls.optimizer.ARGUMENTS.get(info.field_name)
        if rule is not None and broken_rule(rule, v):
            raise ValueError(rule.allowed)
        return v

    @model_validator(mode="after")
    def _cross_argument(self) -> "_OptimizerParams":
        try:
            self.optimizer.check_arguments(**self.arguments())
        except ArgumentError as e:
            raise FieldError(e.name, e.value, e.allowed) from None
        return self

    def arguments(self) -> dict:
        """The optimizer's keyword arguments."""
        return self.model_dump(exclude={"exclude_from_adaptation"})


class LARSParams(_OptimizerParams):
    optimizer: ClassVar[type] = LARS
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001
    eps: float = 0.0
    exclude_from_adaptation: Literal["ndim<=1", "none"] = "ndim<=1"


class LAMBParams(_OptimizerParams):
    optimizer: ClassVar[type] = LAMB
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    min_trust: Optional[float] = None
    max_trust: Optional[float] = None
    exclude_from_adaptation: Literal["ndim<=1", "none"] = "ndim<=1"


class WarmupPolyDecayParams(JsonBlock):
    total_num_steps: int = Field(ge=1)
    warmup_num_steps: Optional[int] = None
    warmup_ratio: Optional[float] = None
    warmup_min_lr: float = 0.0
    power: float = 1.0
    end_lr: float = 0.0

    @field_validator("power")
    @classmethod
    def _power(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be > 0")
        return v

    @model_validator(mode="after")
    def _warmup(self) -> "WarmupPolyDecayParams":
        if (self.warmup_num_steps is None) == (self.warmup_ratio is None):
            raise FieldError("warmup_num_steps", self.warmup_num_steps, "set exactly one of warmup_num_steps and "
                              "warmup_ratio")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise FieldError("warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if self.warmup_num_steps is not None and not 0 <= self.warmup_num_steps <= self.total_num_steps:
            raise FieldError("warmup_num_steps", self.warmup_num_steps,
                              f"must be in [0, total_num_steps={self.total_num_steps}]")
        return self

    @property
    def warmup_steps(self) -> int:
        if self.warmup_num_steps is not None:
            return self.warmup_num_steps
        return round(self.warmup_ratio * self.total_num_steps)


class LRScaling(JsonBlock):
    rule: Literal["linear", "sqrt"]
    reference_batch_size: int = Field(ge=1)


_OPTIMIZERS = {"lars": LARSParams, "lamb": LAMBParams}
_SCHEDULERS = {"warmuppolydecay": WarmupPolyDecayParams}
_DS_LR_FIELDS = ("warmup_max_lr", "warmup_min_lr")
Auto = Literal["auto"]
"""transformers' and accelerate's placeholder, filled in from their own arguments."""


class DeepSpeedOptimizerParams(JsonBlock):
    """The common fields of DeepSpeed's (and torch's) optimizers; others pass through unchecked."""

    model_config = ConfigDict(extra="allow")
    lr: Union[Annotated[float, Field(gt=0)], Auto, None] = None
    weight_decay: Union[Annotated[float, Field(ge=0)], Auto, None] = None
    eps: Union[Annotated[float, Field(gt=0)], Auto, None] = None
    momentum: Optional[float] = Field(None, ge=0, le=1)
    betas: Union[tuple[float, float], Auto, None] = None

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if isinstance(v, tuple) and broken_rule(FRACTION_PAIR, v):  # LAMB's own rule for betas
            raise ValueError(FRACTION_PAIR.allowed)
        return v


class DeepSpeedSchedulerParams(JsonBlock):
    """The common fields of DeepSpeed's schedulers (WarmupLR, WarmupDecayLR, ...)."""

    model_config = ConfigDict(extra="allow")
    warmup_min_lr: Union[Annotated[float, Field(ge=0)], Auto, None] = None
    warmup_max_lr: Union[Annotated[float, Field(gt=0)], Auto, None] = None
    warmup_num_steps: Union[Annotated[int, Field(ge=0)], Auto, None] = None
    total_num_steps: Union[Annotated[int, Field(ge=1)], Auto, None] = None
    warmup_type: Optional[Literal["log", "linear"]] = None


def _deepspeed_types(kind: str) -> tuple[list[str], list[str]]:
    """The names DeepSpeed resolves for an optimizer or scheduler: its own (optimizers in any case),
    then torch's classes by exact name."""
    if kind == "optimizer":
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS as own

        module, base = torch.optim, torch.optim.Optimizer
    else:
        from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES as own

        module, base = torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler
    theirs = sorted(n for n, c in vars(module).items() if isinstance(c, type) and issubclass(c, base) and c is not base)
    return list(own), theirs


def _check_deepspeed_block(block: dict, kind: str, ours: list[str]) -> None:
    """A block DeepSpeed will build: its type must be one DeepSpeed knows and its common numeric
    fields in range, so that a typo fails here and not after the model and data are loaded."""
    name = block["type"]
    own, theirs = _deepspeed_types(kind)
    if not ((name.lower() if kind == "optimizer" else name) in own or name in theirs):
        raise ConfigError(f"{kind}.type={name!r}: unknown{did_you_mean(name, ours + own + theirs)}; allowed: "
                          f"{', '.join(ours)} (conadv_ds), DeepSpeed's {', '.join(own)}, or a class of "
                          f"{'torch.optim' if kind == 'optimizer' else 'torch.optim.lr_scheduler'}")
    model = DeepSpeedOptimizerParams if kind == "optimizer" else DeepSpeedSchedulerParams
    validate_block(model, block.get("params", {}), f"{kind}.params")


def _block(ds: dict, key: str) -> Optional[dict]:
    block = ds.get(key)
    if block is None:
        return None
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise ConfigError(f"{key}={block!r}: must be a JSON object with a string 'type'")
    return block


def prepare_ds_config(ds_config: dict, world_size: int) -> tuple[dict, Optional[dict], Optional[dict]]:
    """(config for DeepSpeed, our optimizer spec or None, our scheduler spec or None).

    Validates our blocks, applies `lr_scaling`, and removes what DeepSpeed must not see. The
    input is not modified."""
    ds = copy.deepcopy(ds_config)
    scaling = ds.pop("lr_scaling", None)
    opt, sched = _block(ds, "optimizer"), _block(ds, "scheduler")
    opt_spec = sched_spec = None
    if opt is not None and opt["type"].lower() in _OPTIMIZERS:
        opt_spec = ds.pop("optimizer")
        validate_block(_OPTIMIZERS[opt["type"].lower()], opt_spec.get("params", {}), "optimizer.params")
        ds["zero_allow_untested_optimizer"] = True
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # ours runs on the CPU under ZeRO-Offload too
    elif opt is not None:
        _check_deepspeed_block(opt, "optimizer", [m.optimizer.__name__ for m in _OPTIMIZERS.values()])
    if sched is not None and sched["type"].lower() in _SCHEDULERS:
        sched_spec = ds.pop("scheduler")
        validate_block(_SCHEDULERS[sched["type"].lower()], sched_spec.get("params", {}), "scheduler.params")
    elif sched is not None:
        _check_deepspeed_block(sched, "scheduler", [WarmupPolyDecay.__name__])
    if scaling is not None:
        rule = validate_block(LRScaling, scaling, "lr_scaling")
        ratio = resolve_batch(ds, world_size)[0] / rule.reference_batch_size
        factor = ratio if rule.rule == "linear" else math.sqrt(ratio)
        for block, fields in ((opt_spec or ds.get("optimizer"), ("lr",)),
                              (sched_spec or ds.get("scheduler"), _DS_LR_FIELDS + ("end_lr",))):
            params = (block or {}).get("params", {})
            for f in fields:
                if isinstance(params.get(f), (int, float)):
                    params[f] = params[f] * factor
    return ds, opt_spec, sched_spec


def build_optimizer(spec: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    """LARS or LAMB over `param_groups(model)`: 1-D parameters excluded from decay and adaptation
    unless `exclude_from_adaptation` is "none"."""
    params_model = _OPTIMIZERS[spec["type"].lower()]
    params = validate_block(params_model, spec.get("params", {}), "optimizer.params")
    args = params.arguments()
    groups = param_groups(model, args["weight_decay"], params.exclude_from_adaptation == "ndim<=1")
    return params_model.optimizer(groups, **args)


def build_scheduler(spec: dict, optimizer: torch.optim.Optimizer) -> WarmupPolyDecay:
    p = validate_block(WarmupPolyDecayParams, spec.get("params", {}), "scheduler.params")
    if optimizer is None:
        raise ConfigError("scheduler.type='WarmupPolyDecay': needs an optimizer block (or an optimizer= argument)")
    return WarmupPolyDecay(optimizer, p.warmup_steps, p.total_num_steps, p.warmup_min_lr, p.power, p.end_lr)


def bind_to_engine(engine) -> None:
    """Give our LARS/LAMB the exact per-layer layout of the engine's ZeRO partitions."""
    inner = engine.optimizer
    while inner is not None and not isinstance(inner, (LARS, LAMB)):
        inner = getattr(inner, "optimizer", None)
    if inner is not None:
        inner.bind_layouts(layouts_for(engine))
