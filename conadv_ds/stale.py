"""Old weights for the attack, kept as each rank's own shard and swapped in for a forward.

A snapshot holds exactly what a rank stores of the live weights: the full model under ZeRO-0,
the rank's flat partition under ZeRO-1/2, the `ds_tensor` shards under ZeRO-3; plus the
module's buffers (BatchNorm running statistics), which every stage replicates. So the attack
of step t sees the whole model as it was after step t-τ, running statistics included, exactly
as a lookahead does (it attacks with the model in place). `swapped` puts a snapshot in place
for the attack forward and restores the live state afterwards; optimizer state, gradients and
master weights are never touched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from .config import ConAdvConfig
from .errors import ConfigError

Snapshot = dict[str, list[Tensor]]
"""{"weights": this rank's parameter shards, "buffers": the module's buffers}."""
Shards = list[Tensor]


class _Replicated:
    """ZeRO-0 or plain data parallel: every rank holds the whole model, so the snapshot is a full copy."""

    def __init__(self, module, tensors=None):
        self.params = list(module.parameters()) if tensors is None else list(tensors)

    def capture(self) -> Shards:
        return [p.detach().clone() for p in self.params]

    @contextmanager
    def swapped(self, snap: Shards) -> Iterator[None]:
        live = [p.data for p in self.params]
        for p, s in zip(self.params, snap):
            p.data = s
        try:
            yield
        finally:
            for p, t in zip(self.params, live):
                p.data = t


class _FlatPartitions:
    """ZeRO-1/2: a rank owns one flat slice per parameter group; the model's (low-precision)
    weights are views of the all-gathered flat buffers."""

    def __init__(self, engine):
        self.opt = engine.optimizer

    def _own(self) -> list[Tensor]:
        from deepspeed import comm as dist

        return [parts[dist.get_rank(group=self.opt.real_dp_process_group[i])]
                for i, parts in enumerate(self.opt.parallel_partitioned_bit16_groups)]

    def capture(self) -> Shards:
        return [t.detach().clone() for t in self._own()]

    @contextmanager
    def swapped(self, snap: Shards) -> Iterator[None]:
        from deepspeed.runtime.utils import all_gather_dp_groups

        with torch.no_grad():
            for own, s in zip(self._own(), snap):
                own.copy_(s)
        all_gather_dp_groups(groups_flat=self.opt.bit16_groups_flat,
                             partitioned_param_groups=self.opt.parallel_partitioned_bit16_groups,
                             dp_process_group=self.opt.real_dp_process_group,
                             start_alignment_factor=self.opt.nccl_start_alignment_factor,
                             allgather_bucket_size=self.opt.allgather_bucket_size)
        try:
            yield
        finally:
            self.opt.update_lp_params()  # the live weights, re-derived from the fp32 master partitions


class _Zero3Shards:
    """ZeRO-3: each parameter's shard is `p.ds_tensor`; the full tensor exists only while a
    module runs, except persistent (small) parameters, which ZeRO-3 keeps gathered. All
    parameters are released before and after the swap, and persistent ones re-gathered from
    the live shards, as DeepSpeed does after an optimizer step."""

    def __init__(self, engine):
        self.params = [p for p in engine.module.parameters()]
        self.offload = engine.optimizer.parameter_offload
        self.persistent = engine.optimizer.persistent_parameters

    def capture(self) -> Shards:
        return [p.ds_tensor.detach().clone() for p in self.params]

    @contextmanager
    def swapped(self, snap: Shards) -> Iterator[None]:
        self.offload.partition_all_parameters()
        live = [p.ds_tensor.data for p in self.params]
        for p, s in zip(self.params, snap):
            p.ds_tensor.data = s
        try:
            yield
        finally:
            self.offload.partition_all_parameters()
            for p, t in zip(self.params, live):
                p.ds_tensor.data = t
            if self.persistent:
                self.persistent[0].all_gather(self.persistent)


class StaleWeights:
    """Parameter shards by the engine's mechanism, buffers as full copies (no stage shards them)."""

    def __init__(self, weights: _Replicated | _FlatPartitions | _Zero3Shards, module):
        self.weights = weights
        self.buffers = _Replicated(module, tensors=module.buffers())

    def capture(self) -> Snapshot:
        return {"weights": self.weights.capture(), "buffers": self.buffers.capture()}

    @contextmanager
    def swapped(self, snap: Snapshot) -> Iterator[None]:
        with self.weights.swapped(snap["weights"]), self.buffers.swapped(snap["buffers"]):
            yield


def stale_weights_for(engine) -> StaleWeights:
    """The snapshot mechanism matching a DeepSpeed engine's ZeRO stage; for anything else (a
    module, or DDP's wrapper around one) a full copy of the module's parameters."""
    module = getattr(engine, "module", engine)
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if stage == 0:
        return StaleWeights(_Replicated(module), module)
    return StaleWeights(_FlatPartitions(engine) if stage in (1, 2) else _Zero3Shards(engine), module)


def check_zero_support(cfg: ConAdvConfig, ds: dict, whole_steps: bool = True) -> None:
    """Refuse, before DeepSpeed starts, the ZeRO-3 features whose weights the old-weight
    mechanisms do not reach: ZeRO++ hpZ gathers from a secondary copy of each shard that a
    snapshot does not swap (the attack would silently use the live weights), and parameter
    offload keeps shards on the CPU or NVMe, where neither snapshots nor the split transport read
    them."""
    mechanism = cfg.stale_mechanism(whole_steps)
    zero = ds.get("zero_optimization") or {}
    if mechanism not in ("snapshot", "split") or zero.get("stage") != 3:
        return
    why = (f"conadv old weights by {mechanism}" + (" (the Trainer attacks one micro-batch at a time)"
                                                    if not whole_steps else ""))
    hpz = zero.get("zero_hpz_partition_size", 1)
    if mechanism == "snapshot" and hpz not in (None, 1):
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size={hpz}: not supported with {why}: ZeRO++ "
                          "gathers from a secondary shard copy the snapshot does not swap; use 1, or staleness 1 "
                          "with stale_weights 'lookahead' in the engine, or schedule 'split'")
    device = (zero.get("offload_param") or {}).get("device", "none")
    if zero.get("cpu_offload_param") is True:
        device = "cpu"
    if device not in (None, "none"):
        raise ConfigError(f"zero_optimization.offload_param.device={device!r}: not supported with {why}: "
                          "the ZeRO-3 shards live off the device; use 'none', or staleness 1 with stale_weights "
                          "'lookahead' in the engine")


def tensor_bytes(tree) -> int:
    """Bytes of storage kept alive by the tensors in a nested structure (lists, tuples, dicts):
    a view keeps its whole base alive, and a storage shared by several tensors counts once."""
    storages: dict[int, int] = {}
    todo = [tree]
    while todo:
        t = todo.pop()
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(t, dict):
            todo.extend(t.values())
        elif isinstance(t, (list, tuple)):
            todo.extend(t)
    return sum(n for ptr, n in storages.items() if ptr != 0)
