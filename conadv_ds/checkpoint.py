"""Crash-safe checkpoint files: nothing a user saved is lost if a process dies mid-save.

A checkpoint is written under `<dir>/<tag>.partial`, moved to `<dir>/<tag>` when every rank
has finished, and only then does the `latest` pointer (replaced atomically) name it. A kill at
any point leaves the previous checkpoint and its pointer intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import ConfigError

LATEST = "latest"
PARTIAL = ".partial"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name in the same folder, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_latest(save_dir: Path, tag: str) -> None:
    tmp = Path(save_dir) / f".{LATEST}.tmp{os.getpid()}"
    tmp.write_text(tag)
    os.replace(tmp, Path(save_dir) / LATEST)


def read_latest(save_dir: Path) -> Optional[str]:
    path = Path(save_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def publish(save_dir: Path, tag: str, update_latest: bool = True) -> None:
    """Move `<tag>.partial` into place as `<tag>` (replacing an older `<tag>`), then point `latest` at it."""
    save_dir = Path(save_dir)
    final, partial = save_dir / tag, save_dir / f"{tag}{PARTIAL}"
    old = save_dir / f"{tag}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    if update_latest:
        write_latest(save_dir, tag)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    """Every random stream a training step can draw from, for this process."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_SCHEDULE_KEYS = ("enabled", "schedule", "staleness", "stale_weights")


def check_same_schedule(saved: Optional[dict], current: dict, where: str) -> None:
    """A checkpoint's ConAdv state only continues the schedule that wrote it: a different
    schedule, staleness or stale-weight mechanism is a one-line error, not a mixed run."""
    if saved is None:
        return
    diff = [k for k in _SCHEDULE_KEYS if saved.get(k) != current.get(k)]
    if diff:
        raise ConfigError(f"checkpoint {where!r}: saved with " + ", ".join(f"conadv.{k}={saved.get(k)!r}" for k in diff)
                          + " but this run has " + ", ".join(f"{current.get(k)!r}" for k in diff)
                          + "; resume with the saved settings or start a new output folder")
