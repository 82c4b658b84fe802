"""Command-line entry points: config validation without a launcher, and one-line errors.

    conadv-validate ds_configs/96k.json --world_size 512
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable, Optional, Sequence, TypeVar

from .errors import ConfigError
from .resolve import resolve_config

F = TypeVar("F", bound=Callable)
USAGE_ERROR = 2


def one_line_errors(main: F) -> F:
    """Run `main`, turning a ConfigError into `error: <message>` on stderr and exit code 2
    (no traceback), like argparse does for bad flags."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(USAGE_ERROR) from None

    return wrapper  # type: ignore[return-value]


def run_launched(main: Callable[[], object]) -> None:
    """Run a launched program's `main`, then destroy torch.distributed's process groups, as
    torch asks of every program that made them: left to interpreter exit, gloo's worker threads
    can abort a finished run (SIGABRT, "terminate called without an active exception"). After an
    exception nothing is destroyed: that would wait for ranks that may be gone."""
    import torch.distributed as dist

    main()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= {minimum}")
        return value

    return parse


count = _integer_at_least(0)
"""argparse type for flags counting steps or checkpoints (0 allowed: "none" or "keep all")."""
positive = _integer_at_least(1)
"""argparse type for intervals that divide step numbers."""


def parse_overrides(pairs: Sequence[str]) -> dict:
    """`--conadv KEY=VALUE` flags as a dict; values are JSON when they parse as JSON, else strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--conadv {pair!r}: expected KEY=VALUE, e.g. --conadv epsilon=0.05")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def validate(config: str, world_size: int, overrides: Optional[dict] = None) -> dict:
    """Everything conadv_ds checks before DeepSpeed starts; returns the resolved summary. With
    schedule 'split', `world_size` counts every launched rank and the batch counts the trainers."""
    run = resolve_config(config, overrides, launch_size=world_size)
    split_plan = {"attacker_ranks": list(run.layout.attackers), "launched_ranks": run.launch_size} if run.layout else {}
    return {"world_size": run.batch.world_size, **split_plan, "train_batch_size": run.batch.train_batch_size,
            "micro_batch_per_rank": run.batch.micro_batch_per_rank,
            "gradient_accumulation_steps": run.batch.gradient_accumulation_steps,
            "zero_stage": run.ds.get("zero_optimization", {}).get("stage", 0),
            "optimizer": (run.optimizer or run.ds.get("optimizer") or {}).get("type"),
            "scheduler": (run.scheduler or run.ds.get("scheduler") or {}).get("type"),
            "conadv": run.conadv.model_dump()}


@one_line_errors
def validate_main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="conadv-validate", description="Check a DeepSpeed JSON with a conadv block "
                                     "for a world size, without starting DeepSpeed.")
    parser.add_argument("config", help="DeepSpeed JSON path")
    parser.add_argument("--world_size", type=int, default=1)
    args = parser.parse_args(argv)
    if args.world_size < 1:
        raise ConfigError(f"--world_size={args.world_size}: must be >= 1")
    print(json.dumps(validate(args.config, args.world_size), indent=2))


if __name__ == "__main__":
    validate_main()
