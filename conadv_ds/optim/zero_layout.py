"""Where each model parameter lives inside the flat tensors a ZeRO optimizer hands its inner optimizer.

ZeRO-1/2 (and DeepSpeed's bf16 optimizer) give the inner optimizer one flat fp32 slice per
parameter group; ZeRO-3 one flat tensor per sub-group made of each parameter's shard. A
layer-wise optimizer (LARS, LAMB) needs per-*layer* norms, so each rank sums the squares of the
pieces it owns and the sums are reduced across the data-parallel group: `FlatLayout` records,
for one flat tensor, every layer of its group (the same list on every rank) and the pieces this
rank owns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class FlatLayout:
    num_layers: int
    """Layers in this flat tensor's group: the length of the reduced norm vector on every rank."""
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    """(layer index, start, numel) of each piece this rank owns."""
    group: Any = None
    """Process group over which the per-layer sums are reduced."""


def layouts_for(engine) -> dict[int, FlatLayout]:
    """Flat-tensor layouts of the engine's ZeRO optimizer, keyed by `id(flat tensor)`; empty when
    the inner optimizer sees the model's own parameters."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return _stage3(zero)
    for lp_attr, hp_attr in (("bit16_groups", "single_partition_of_fp32_groups"),
                             ("bf16_groups", "fp32_groups_flat_partition")):
        if hasattr(zero, lp_attr) and hasattr(zero, hp_attr):
            return _partitioned(getattr(zero, lp_attr), getattr(zero, hp_attr), _dp_groups(zero))
    return {}


def _dp_groups(zero) -> Callable[[int], Any]:
    groups = getattr(zero, "real_dp_process_group", None)
    if groups is not None:
        return lambda i: groups[i]
    group = getattr(zero, "dp_process_group", None)
    return lambda i: group


def _partitioned(lp_groups, hp_flats, dp_group: Callable[[int], Any]) -> dict[int, FlatLayout]:
    out = {}
    for i, (lp_params, flat) in enumerate(zip(lp_groups, hp_flats)):
        layout = FlatLayout(len(lp_params), [], dp_group(i))
        for li, p in enumerate(lp_params):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                addr = mapping.get_hp_fragment_address()
                if addr.numel > 0:
                    layout.segments.append((li, addr.start, addr.numel))
        out[id(flat)] = layout
    return out


def _stage3(zero) -> dict[int, FlatLayout]:
    """Each sub-group's flat tensor is the concatenation of its parameters' shards, in order;
    the zero padding at the end of the last shard contributes nothing to any norm."""
    out = {}
    for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
        if flat is None:
            continue
        params = zero.fp16_groups[i]
        layout, offset = FlatLayout(len(params), [], zero.dp_process_group), 0
        for li, p in enumerate(params):
            n = p.partition_numel()
            layout.segments.append((li, offset, n))
            offset += n
        out[id(flat)] = layout
    return out
