"""Shared by the benchmarks: start on 2 CPU ranks, time steps side by side, print on rank 0."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ranks(nproc: int = 2) -> None:
    """Re-run the calling script under torchrun with `nproc` CPU ranks unless already launched."""
    if "LOCAL_RANK" in os.environ:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), sys.argv[0], *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sys.exit(subprocess.call(cmd, env=env))


def rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(*args) -> None:
    if rank0():
        print(*args, flush=True)


def alternate(steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each step function, calling them in turn every round so that
    machine noise hits all of them alike."""
    import torch.distributed as dist

    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for name, fn in steps.items():
            if dist.is_initialized():
                dist.barrier()
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _storages(roots, stop: set[int]) -> dict[int, int]:
    """{storage address: bytes} of every tensor reachable from `roots` through containers,
    instances and tensor attributes (ZeRO-3's `ds_tensor`), not through modules, classes or
    functions (their globals reach everything); objects whose id is in `stop` are not entered."""
    import gc
    import types

    import torch

    found, seen, todo = {}, set(stop), list(roots)
    opaque = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.CodeType, str, bytes)
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, opaque):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                storage = obj.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
            todo.extend(getattr(obj, "__dict__", {}).values())
            continue
        todo.extend(gc.get_referents(obj))
    return found


def held_bytes(obj, *owners) -> int:
    """Measured bytes of tensor storage that `obj` keeps alive beyond what `owners` (the engine,
    the data iterator) already hold: found by walking the object graph, independent of any
    accounting `obj` does itself."""
    base = _storages(owners, stop={id(obj)})
    return sum(n for ptr, n in _storages([obj], stop=set()).items() if ptr not in base and ptr != 0)
