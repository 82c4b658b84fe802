"""Crash-safe checkpoint folders: nothing a user saved is lost if a process dies mid-save.

A checkpoint is written under `<dir>/<tag>.partial`, moved to `<dir>/<tag>` when every rank
has finished, and only then does the `latest` pointer (replaced atomically) name it. Saving a
tag that exists moves the old folder aside as `<tag>.old` first; `recover` (run before every
save and load) puts it back if a kill came between the two moves, and clears the `.partial`
folders of saves that never finished. Published tags are listed, oldest first, in
`<dir>/checkpoints`; `prune` keeps the newest `keep` of them and never the one `latest` names.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from .errors import ConfigError

LATEST = "latest"
PARTIAL = ".partial"
OLD = ".old"
MANIFEST = "checkpoints"


def _plain(obj: Any) -> Any:
    """`obj` with only what `torch.load(weights_only=True)` rebuilds: mappings (e.g. a tokenizer's
    BatchEncoding) as dicts, numpy arrays as tensors, everything else as it is."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    return obj


def atomic_save(obj: Any, path: Path) -> None:
    """A per-rank state file: torch.save of `obj` in plain types (tensors, numbers, strings,
    containers; `load_state` reads nothing else) to a temporary name in the same folder, then
    renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(_plain(obj), tmp)
    os.replace(tmp, path)


DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")
"""The classes DeepSpeed 0.19's model and optimizer state files hold (ZeRO 0-3, fp16/bf16): the
only ones a safe load builds besides tensors, numbers, strings and containers."""


def _allowed() -> list:
    import importlib

    out = []
    for name in DEEPSPEED_GLOBALS:
        module, attr = name.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), attr))
    return out


def load_state(path: Path, map_location: Any = "cpu") -> Any:
    """A checkpoint file — ours per rank, or DeepSpeed's model and optimizer states — read with
    `torch.load(weights_only=True)`, only DeepSpeed's own state classes (`DEEPSPEED_GLOBALS`)
    allowed: nothing in it can run code. A file that is not one (tampered, truncated, from a
    DeepSpeed with other classes) is a one-line error naming it."""
    try:
        with torch.serialization.safe_globals(_allowed()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError (a global it will not build), EOFError / RuntimeError (truncated)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{path}: not a checkpoint file that loads safely ({type(e).__name__}: {reason}); "
                          "it is damaged, truncated, replaced or from another DeepSpeed version: restore the "
                          "checkpoint folder from a good copy, resume from an earlier checkpoint, or start a new "
                          "output folder") from None


def check_files(folder: Path) -> None:
    """Every `*.pt` file under a checkpoint folder (and accelerate's `custom_checkpoint_*.pkl`, which
    it reads with weights_only=False), checked without loading it (no pickle runs):
    one that needs a class a safe load will not build, or is truncated, is the one-line error of
    `load_state`, raised before anything is loaded."""
    allowed = set(DEEPSPEED_GLOBALS)
    files = [*Path(folder).rglob("*.pt"), *Path(folder).rglob("custom_checkpoint_*.pkl")]  # accelerate: unsafe load
    for f in sorted(files):
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(f) if g not in allowed]
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            unsafe = [f"unreadable: {reason}"]
        if unsafe:
            raise ConfigError(f"{f}: not a checkpoint file that loads safely (needs {', '.join(unsafe)}); it is "
                              "damaged, truncated, replaced or from another DeepSpeed version: restore the "
                              "checkpoint folder from a good copy, resume from an earlier checkpoint, or start a "
                              "new output folder")


def use_safe_loading(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoint files with `load_state` (DeepSpeed's own
    TorchCheckpointEngine unpickles them with weights_only=False); other engines are left alone."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is TorchCheckpointEngine:
        current.load = lambda path, map_location=None: load_state(path, map_location)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_latest(save_dir: Path, tag: str) -> None:
    _write_text(Path(save_dir) / LATEST, tag)


def read_latest(save_dir: Path) -> Optional[str]:
    path = Path(save_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def _folders(save_dir: Path, suffix: str) -> list[Path]:
    return [d for d in save_dir.glob(f"*{suffix}") if d.is_dir()]


def recover(save_dir: Path) -> None:
    """Undo what a killed save left: a `<tag>.old` of a listed tag whose replacement never arrived
    goes back to `<tag>`; leftover `.old` (of listed tags) and `.partial` folders are removed.
    One process calls it, before the other ranks read or write (the save and load paths put a
    barrier after it)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return
    listed_tags = set(listed(save_dir))
    for old in _folders(save_dir, OLD):
        final = old.with_name(old.name[: -len(OLD)])
        if final.name not in listed_tags:
            continue  # not a checkpoint this module published: not ours to touch
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for partial in _folders(save_dir, PARTIAL):
        shutil.rmtree(partial, ignore_errors=True)


def publish(save_dir: Path, tag: str, update_latest: bool = True) -> None:
    """Move `<tag>.partial` into place as `<tag>` (an older `<tag>` is moved aside first and
    restored by `recover` if this is interrupted), list the tag, then point `latest` at it."""
    save_dir = Path(save_dir)
    final, partial, old = save_dir / tag, save_dir / f"{tag}{PARTIAL}", save_dir / f"{tag}{OLD}"
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    _write_manifest(save_dir, [t for t in listed(save_dir) if t != tag] + [tag])
    if update_latest:
        write_latest(save_dir, tag)
    shutil.rmtree(old, ignore_errors=True)


def listed(save_dir: Path) -> list[str]:
    """Published tags, oldest first."""
    path = Path(save_dir) / MANIFEST
    return path.read_text().split() if path.is_file() else []


def _write_manifest(save_dir: Path, tags: list[str]) -> None:
    _write_text(Path(save_dir) / MANIFEST, "".join(f"{t}\n" for t in tags))


def check_total_limit(keep: Optional[int]) -> None:
    if keep is not None and keep < 1:
        raise ConfigError(f"save_total_limit={keep}: must be >= 1 (or None to keep every checkpoint)")


def prune(save_dir: Path, keep: Optional[int]) -> list[str]:
    """Delete the oldest published checkpoints beyond the newest `keep` (None: keep all); the one
    `latest` names is never deleted. Returns the tags deleted."""
    check_total_limit(keep)
    if keep is None:
        return []
    save_dir = Path(save_dir)
    tags, latest = listed(save_dir), read_latest(save_dir)
    doomed = [t for t in tags[: max(len(tags) - keep, 0)] if t != latest]
    for t in doomed:
        shutil.rmtree(save_dir / t, ignore_errors=True)
    _write_manifest(save_dir, [t for t in tags if t not in doomed])
    return doomed


def save_folder(save_dir: Path, tag: str, main: bool, barrier: Callable[[], None],
                write: Callable[[Path], None], identity: dict, update_latest: bool = True,
                keep: Optional[int] = None) -> None:
    """The crash-safe save every front end makes: the main process repairs what a killed save
    left, every rank runs `write(<tag>.partial)`, the main process adds the run's identity and,
    once all are done, publishes the folder and keeps the newest `keep`."""
    save_dir = Path(save_dir)
    check_total_limit(keep)  # before anything is written
    if main:
        recover(save_dir)
    barrier()
    partial = save_dir / f"{tag}{PARTIAL}"
    write(partial)
    if main:
        write_run(partial, identity)
    barrier()
    if main:
        publish(save_dir, tag, update_latest=update_latest)
        prune(save_dir, keep)
    barrier()


def open_folder(load_dir: Path, tag: Optional[str], main: bool, barrier: Callable[[], None],
                identity: dict) -> Optional[str]:
    """The tag to load (`tag`, else the one `latest` names; None when there is none), after the
    main process has repaired what a killed save left and every rank has checked the folder was
    written by a run with this identity."""
    load_dir = Path(load_dir)
    if main:
        recover(load_dir)
    barrier()
    tag = tag if tag is not None else read_latest(load_dir)
    if tag is not None:
        check_run(load_dir / tag, identity)
    return tag


def rng_state() -> dict:
    """Every random stream a training step can draw from, for this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_SCHEDULE_KEYS = ("enabled", "schedule", "staleness", "stale_weights")
RUN_FILE = "conadv_run.json"
"""The run a checkpoint continues (conadv block, world size): small, written once, read by every rank."""


def run_identity(conadv: dict, world_size: int) -> dict:
    """What a checkpoint's per-rank state depends on: the conadv block and the world size."""
    return {"conadv": conadv, "world_size": world_size}


def write_run(folder: Path, identity: dict) -> None:
    _write_text(Path(folder) / RUN_FILE, json.dumps(identity, sort_keys=True))


def check_run(folder: Path, identity: dict) -> None:
    """On every rank, before anything is loaded: the checkpoint in `folder` was written by a run
    with this identity (`check_same_run`); a rank the saving run did not have fails here too."""
    path = Path(folder) / RUN_FILE
    if path.is_file():
        check_same_run(json.loads(path.read_text()), identity, str(folder))


def check_same_run(saved: dict, current: dict, where: str) -> None:
    """A checkpoint's per-rank ConAdv state only continues the run that wrote it: another
    schedule, staleness, stale-weight mechanism or world size is a one-line error naming the
    field and both values, not a mixed run or a `KeyError` deep in a swap."""
    pairs = [(f"conadv.{k}", (saved.get("conadv") or {}).get(k), current["conadv"].get(k)) for k in _SCHEDULE_KEYS
             if saved.get("conadv") is not None]
    if "world_size" in saved:
        pairs.append(("world size", saved["world_size"], current["world_size"]))
    diff = [(name, a, b) for name, a, b in pairs if a != b]
    if diff:
        raise ConfigError(f"checkpoint {where!r}: saved with " + ", ".join(f"{n}={a!r}" for n, a, _ in diff)
                          + " but this run has " + ", ".join(f"{b!r}" for *_, b in diff)
                          + "; resume with the saved settings or start a new output folder")
