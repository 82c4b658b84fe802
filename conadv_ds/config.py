"""The `"conadv"` block of a DeepSpeed JSON, and the checks DeepSpeed would only make late.

The block sits next to DeepSpeed's own keys in the same file::

    {"train_batch_size": 1024, "optimizer": {...},
     "conadv": {"schedule": "conadv", "staleness": 1, "epsilon": 0.0353}}

It is validated here, before DeepSpeed starts, and removed from the dict handed to DeepSpeed.
Defaults are the official ConAdv code's (ResNet-50 on ImageNet, [0, 1] pixels).
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, FieldError, did_you_mean

CONADV_KEY = "conadv"
TIMERS_KEY = "timers"
PIXEL_EPSILON = 9 / 255


def _takes_tuple(info: Any) -> bool:
    annotation = getattr(info, "annotation", None)
    return tuple in (typing.get_origin(annotation), *map(typing.get_origin, typing.get_args(annotation)))


class JsonBlock(BaseModel):
    """A block of the JSON config read strictly: unknown keys, a string where a boolean belongs,
    a float where an integer belongs, and NaN or infinity are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _json_arrays(cls, data: Any) -> Any:
        """JSON has arrays, not tuples: a list given for a tuple-typed field is read as a tuple."""
        if not isinstance(data, dict):
            return data
        return {k: tuple(v) if isinstance(v, list) and _takes_tuple(cls.model_fields.get(k)) else v
                for k, v in data.items()}


class ConAdvConfig(JsonBlock):
    """What the adversarial part of training does; one instance per run."""

    model_config = ConfigDict(frozen=True, validate_default=True)

    enabled: bool = True
    """A present block is on unless it says otherwise; no block means plain DeepSpeed."""
    schedule: Literal["clean", "disadv", "conadv", "split"] = "conadv"
    """clean: no attack; disadv: attack with the current weights; conadv: with weights
    `staleness` steps old; split: conadv computed on dedicated attacker ranks."""
    staleness: int = Field(1, ge=0)
    """τ: the perturbation of batch t comes from the weights after step max(t-τ, 0)."""
    stale_weights: Literal["auto", "lookahead", "snapshot"] = "auto"
    """How old weights are realised: lookahead (τ=1, attack the next batch with the weights in
    place, no copy) or snapshot (each rank keeps its own shard of old weights). auto picks
    lookahead for τ=1 where the loop hands over whole steps, snapshot otherwise."""
    space: Literal["auto", "pixel", "embedding"] = "auto"
    """Where δ lives: the input pixels, or the word-embedding output; auto: embedding space for
    models with a word embedding (`get_input_embeddings()` is an `nn.Embedding`), else pixel."""
    norm: Literal["linf", "l2"] = "linf"
    epsilon: float = Field(PIXEL_EPSILON, gt=0)
    epsilon_scale: Literal["total", "per_element"] = "total"
    """How an L2 ε and step are measured. total: δ's L2 norm over the whole sample (pixel space,
    FreeLB). per_element: δ's root mean square over the perturbed elements, i.e. a radius of
    ε·√(L·d) for L real tokens of width d: one ε then means the same per coordinate at any hidden
    size and sequence length, as an L∞ ε does (the text convention). L∞ is per element either way."""
    step_size: float = Field(PIXEL_EPSILON, gt=0)
    steps: int = Field(1, ge=1)
    targeted: bool = True
    """Targeted: descend the loss towards a random wrong label; else ascend the true label's."""
    clean_start_prob: float = Field(0.2, ge=0, le=1)
    """Probability (one draw per micro-batch) that PGD starts at δ=0 instead of a random point."""
    adv_weight: float = Field(0.5, gt=0, le=1)
    """λ in (1-λ)·L(x) + λ·L(x+δ)."""
    clip_range: Union[tuple[float, float], None, Literal["auto"]] = "auto"
    """Valid range of x+δ; null for none. auto: [0, 1] for `(images, labels)` batches (images fed
    in [0, 1], normalised inside the model), none for dict batches and in embedding space."""
    aux_bn: bool = False
    """Route adversarial samples through their own BatchNorm statistics (AdvProp / official mixbn)."""
    attack_bn: Literal["eval", "train"] = "train"
    """BatchNorm mode of the attack forward: batch statistics (train) or running ones (eval).
    Running statistics are never updated by the attack either way."""
    seed: int = Field(1234, ge=0)
    """Seed of the attack's own random stream (random start, targets, dropout in the attack)."""
    max_nonfinite_steps: int = Field(3, ge=0)
    """Abort after this many consecutive steps with a NaN/inf loss (fp32/bf16; fp16 overflow is
    DeepSpeed's loss scaler's business); 0 never aborts."""
    attacker_ranks: Optional[Union[int, list[int]]] = None
    """split schedule only: how many (or which) ranks attack instead of train."""

    @field_validator("clip_range")
    @classmethod
    def _range(cls, v):
        if isinstance(v, tuple) and not v[0] < v[1]:
            raise ValueError("must be [lo, hi] with lo < hi, null, or \"auto\"")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ConAdvConfig":
        if self.schedule in ("conadv", "split") and self.staleness < 1:
            raise FieldError("staleness", self.staleness,
                             f"must be >= 1 for schedule '{self.schedule}' (staleness 0 is schedule 'disadv')")
        if self.stale_weights == "lookahead" and self.schedule == "conadv" and self.staleness != 1:
            raise FieldError("stale_weights", "lookahead",
                             f"needs staleness 1 (got {self.staleness}); use 'snapshot' or 'auto'")
        if self.schedule != "split" and self.attacker_ranks is not None:
            raise FieldError("attacker_ranks", self.attacker_ranks, "is only valid with schedule 'split'")
        return self

    @property
    def adversarial(self) -> bool:
        """Whether training batches get a perturbed half."""
        return self.enabled and self.schedule != "clean"

    def stale_mechanism(self, whole_steps: bool) -> Optional[Literal["lookahead", "snapshot", "split"]]:
        """How old weights reach the attack (None: no old weights). Loops that hand over one
        micro-batch at a time (`whole_steps=False`) cannot look ahead and use snapshots."""
        if not self.adversarial or self.schedule == "disadv":
            return None
        if self.schedule == "split":
            return "split"
        lookahead = self.staleness == 1 and self.stale_weights in ("auto", "lookahead")
        return "lookahead" if whole_steps and lookahead else "snapshot"


def _one_line(err: ValidationError, prefix: str, model: type[BaseModel]) -> ConfigError:
    first = err.errors()[0]
    path = [p for p in first["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _UNION_TAGS)]
    loc = ".".join(str(p) for p in path)
    field = f"{prefix}.{loc}" if loc else prefix
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return ConfigError(f"{field}: unknown key{did_you_mean(str(first['loc'][-1]), model.model_fields)}; "
                           f"allowed: {allowed}")
    ctx_err = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_err, FieldError):
        return ConfigError(f"{prefix}.{ctx_err.field}={ctx_err.value!r}: {ctx_err.rule}")
    msg = _TYPE_RULES.get(first["type"], first["msg"].removeprefix("Value error, "))
    if first["type"] in _BOUND_ERRORS:
        whole = _bounds_rule(model, str(path[0])) if len(path) == 1 else None
        msg = whole or _BOUND_ERRORS[first["type"]].format(*first["ctx"].values())
    return ConfigError(f"{field}={value!r}: {msg}")


_UNION_TAGS = {"int", "float", "str", "bool", "list", "tuple", "dict", "none"}
"""Names pydantic puts in an error's location for the member of a union that failed."""
_TYPE_RULES = {"bool_type": "must be true or false (a JSON boolean)", "int_type": "must be an integer",
               "float_type": "must be a number", "finite_number": "must be a finite number",
               "string_type": "must be a string"}
_BOUND_ERRORS = {"greater_than": "must be > {}", "greater_than_equal": "must be >= {}", "less_than": "must be < {}",
                 "less_than_equal": "must be <= {}"}


def _bounds_rule(model: type[BaseModel], name: str) -> Optional[str]:
    """A field's `Field(ge=…, le=…)` bounds as one rule: "must be in [0, 1]", "must be > 0"."""
    info = model.model_fields.get(name)
    if info is None:
        return None
    lo = hi = None
    for m in info.metadata:
        for attr, bracket in (("ge", "["), ("gt", "(")):
            if getattr(m, attr, None) is not None:
                lo = (bracket, getattr(m, attr))
        for attr, bracket in (("le", "]"), ("lt", ")")):
            if getattr(m, attr, None) is not None:
                hi = (bracket, getattr(m, attr))
    if lo and hi:
        return f"must be in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"must be {'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f"must be {'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return None


M = TypeVar("M", bound=BaseModel)


def validate_block(model: type[M], data: Any, where: str) -> M:
    """Validate one JSON block against `model`; any failure is a one-line ConfigError under `where`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}={data!r}: must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _one_line(e, where, model) from None


def parse_conadv(block: Any) -> ConAdvConfig:
    """Validate a `conadv` block (dict, or None for "no block": disabled)."""
    if block is None:
        return ConAdvConfig(enabled=False)
    return validate_block(ConAdvConfig, block, CONADV_KEY)


def load_json(config: Union[str, Path, dict]) -> dict:
    """Read a DeepSpeed JSON (path, dict or inline JSON text) with one-line errors for missing or
    malformed files."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))  # a private deep copy
    if isinstance(config, str) and config.lstrip().startswith("{"):  # inline JSON, as transformers accepts
        try:
            data = json.loads(config)
        except json.JSONDecodeError as e:
            raise ConfigError(f"inline JSON {config!r}: invalid at column {e.colno}: {e.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"inline JSON {config!r}: must be a JSON object")
        return data
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r}: not found")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(path)!r}: invalid JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: top level must be a JSON object, got {type(data).__name__}")
    return data


def check_finite(data: Any, where: str = "") -> None:
    """No NaN or infinity anywhere in a config (Python's JSON reader accepts `Infinity`)."""
    if isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{where or 'config'}={data!r}: must be a finite number")
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        check_finite(value, f"{where}.{key}" if where else str(key))


def _positive_int(ds: dict, key: str) -> Optional[int]:
    if key not in ds or ds[key] is None or ds[key] == "auto":
        return None
    v = ds[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{key}={v!r}: must be a positive integer")
    return v


def resolve_batch(ds: dict, world_size: int) -> tuple[int, int, int]:
    """(train_batch_size, micro_batch_per_rank, gradient_accumulation_steps) for a world size.

    Follows DeepSpeed's rule train_batch_size = micro × accumulation × world_size, deriving the
    missing one(s), and says which field breaks it.
    """
    tb = _positive_int(ds, "train_batch_size")
    mb = _positive_int(ds, "train_micro_batch_size_per_gpu")
    gas = _positive_int(ds, "gradient_accumulation_steps")
    ws = world_size
    if tb is None and mb is None:
        raise ConfigError("train_batch_size: missing; set train_batch_size and/or train_micro_batch_size_per_gpu")
    if tb is not None and mb is not None and gas is not None:
        if tb != mb * gas * ws:
            raise ConfigError(f"train_batch_size={tb}: must equal train_micro_batch_size_per_gpu ({mb}) × "
                              f"gradient_accumulation_steps ({gas}) × world size ({ws}) = {mb * gas * ws}")
    elif tb is not None and mb is not None:
        if tb % (mb * ws):
            raise ConfigError(f"train_batch_size={tb}: not divisible by train_micro_batch_size_per_gpu ({mb}) × "
                              f"world size ({ws}); allowed: multiples of {mb * ws}")
        gas = tb // (mb * ws)
    elif tb is not None:
        gas = gas or 1
        if tb % (gas * ws):
            raise ConfigError(f"train_batch_size={tb}: not divisible by gradient_accumulation_steps ({gas}) × "
                              f"world size ({ws}); allowed: multiples of {gas * ws}")
        mb = tb // (gas * ws)
    else:
        gas = gas or 1
        tb = mb * gas * ws
    return tb, mb, gas


def check_deepspeed(ds: dict, world_size: int) -> tuple[int, int, int]:
    """Checks on DeepSpeed's own keys that DeepSpeed makes late, cryptically or never."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization={zero!r}: must be a JSON object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r}: allowed: 0, 1, 2, 3")
    for key in ("fp16", "bf16"):
        block = ds.get(key, {})
        if not isinstance(block, dict):
            raise ConfigError(f"{key}={block!r}: must be a JSON object like {{\"enabled\": true}}")
    if ds.get("fp16", {}).get("enabled") is True and ds.get("bf16", {}).get("enabled") is True:
        raise ConfigError("fp16.enabled=true and bf16.enabled=true: choose at most one")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError(f"gradient_clipping={clip!r}: must be a number >= 0")
    return resolve_batch(ds, world_size)


def half_precision(ds: dict) -> Optional[str]:
    """"bf16" or "fp16" when that block of `ds` is enabled (`check_deepspeed` allows one), else None."""
    return next((mode for mode in ("bf16", "fp16") if ds.get(mode, {}).get("enabled") is True), None)


def without_timer_syncs(ds: dict) -> dict:
    """`ds` with DeepSpeed's throughput timer off unless it configures `timers`.

    The timer synchronizes the device at every engine forward made without DeepSpeed's own
    dataloader, and a ConAdv micro-batch makes three (attack, clean, adversarial): on a GPU,
    three stalls per micro-batch. Our per-step `samples_per_sec` takes its place: measured over
    the whole step and closed by the step's one metrics read, it includes the device's work."""
    return ds if TIMERS_KEY in ds else {**ds, TIMERS_KEY: {"throughput": {"enabled": False}}}
