"""The multi-tensor machinery behind LARS and LAMB: per-layer norms of a parameter group with
`torch._foreach_norm` and at most one all-reduce, and cache-sized pieces for the updates.

A `GroupPlan` cuts each tensor of a group (a model parameter, or a ZeRO flat partition) into
*chunks*: the pieces of layers this rank owns, split further on the CPU into chunks of at most
one *block* (sized so that a block's streams fit the L2 cache). Consecutive chunks form blocks
(small layers share one), and consecutive blocks holding whole layers form *units*: a unit's
norms need only its own chunks. Under ZeRO the group is one unit, since its sums are reduced
across ranks with one all-reduce; without ZeRO on the CPU a unit is about `UNIT_BLOCKS` blocks,
so that an update re-reads what its norms have just read from cache rather than from memory.
On an accelerator a group is one unit of one block of whole pieces: there a launch per chunk
would cost more than the cache saves.

Per-layer factors are handed out per chunk: as 0-d tensors on the device, or, for a CPU plan
that asks, as numbers (`host_factors`): on the CPU ops run eagerly, so reading a value costs
nothing and lets a fused kernel take it as an argument; on an accelerator it would stall the
stream, and its plans never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..reduce import all_reduce_sum_
from .zero_layout import FlatLayout

CPU_L2_BYTES = 1 << 20
"""Cache budget for one block's streams on the CPU (half a typical per-core L2)."""
BLOCK_ELEMENTS: Optional[int] = None
"""Fixed CPU block size in elements instead of one derived from `CPU_L2_BYTES` (the tests use
small blocks to cut every layer into several chunks)."""
UNIT_BLOCKS = 16
"""Blocks per unit without ZeRO on the CPU (a layer larger than that is a unit of its own)."""


@dataclass
class Unit:
    start: int
    stop: int
    """[start, stop) range of the plan's chunks."""
    blocks: tuple[int, int]
    """[first, last) range of the plan's blocks."""
    num_layers: int
    """Layers whose norms the unit computes (every layer of the group for a reduced plan)."""
    chunk_layer: Tensor
    """Each chunk's layer among the unit's `num_layers` (int64, on the tensors' device)."""
    chunk_sizes: list[int]
    """Elements of each of the unit's chunks."""
    whole_layers: bool
    """Each chunk is one whole layer, in order: the chunk norms are the layer norms."""


@dataclass
class GroupPlan:
    splits: list[Optional[tuple[list[int], list[int]]]]
    """Per tensor: sizes that cut its flat view into pieces and which pieces are chunks, or None
    when the whole tensor is one chunk."""
    chunk_tensor: list[int]
    """Index (into the group's tensor list) of each chunk's tensor."""
    chunk_sizes: list[int]
    blocks: list[tuple[int, int]]
    """[start, end) chunk ranges, each at most one block (or one chunk larger than it)."""
    units: list[Unit]
    process_group: Any
    """Group over which the per-layer sums are reduced; None when every layer is local."""
    device: torch.device
    host_factors: bool
    """A CPU plan (one cut into blocks): `per_chunk(..., host=True)` may read factors to the host."""
    _views: dict = field(default_factory=dict)

    def chunks(self, tensors: Sequence[Tensor], name: Optional[str] = None) -> list[Tensor]:
        """Views of `tensors` (the group's tensors, or tensors shaped like them: grads, state)
        cut into this plan's chunks. With a `name`, the views are kept for the next call with
        the same name while the tensors keep their storage (parameters and optimizer state; not
        gradients, whose old storage the views would keep alive)."""
        if name is not None:
            key = tuple(t.data_ptr() for t in tensors)
            cached = self._views.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
        out: list[Tensor] = []
        for t, split in zip(tensors, self.splits):
            if split is None:
                out.append(t.view(-1))
                continue
            pieces = t.view(-1).split_with_sizes(split[0])
            out.extend(pieces if len(split[1]) == len(pieces) else [pieces[k] for k in split[1]])
        if name is not None:
            self._views[name] = (key, out)
        return out

    def unit_blocks(self, unit: Unit) -> list[tuple[int, int]]:
        return self.blocks[unit.blocks[0]:unit.blocks[1]]

    def layer_norms(self, unit: Unit, norms: Sequence[Tensor], k: int) -> Tensor:
        """`norms`: the norms of the unit's chunks of `k` chunk lists, list after list. Returns the
        per-layer L2 norms, shape (k, unit.num_layers), exact across ranks: the squared sums are
        reduced with one all-reduce."""
        if unit.whole_layers and norms:
            return torch.stack(list(norms)).view(k, unit.num_layers).float()
        sums = torch.zeros(k, unit.num_layers, dtype=torch.float32, device=self.device)
        if norms:
            sums.index_add_(1, unit.chunk_layer, torch.stack(list(norms)).float().square_().view(k, -1))
        if self.process_group is not None:
            all_reduce_sum_(sums, self.process_group)
        return sums.sqrt_()

    def per_chunk(self, unit: Unit, per_layer: Tensor, host: bool = False) -> Sequence:
        """A per-layer vector of the unit as one 0-d tensor per chunk (no host sync), or with
        `host` on a plan with `host_factors`, as one number per chunk."""
        chunks = per_layer if unit.whole_layers else per_layer.index_select(0, unit.chunk_layer)
        return chunks.tolist() if host and self.host_factors else chunks.unbind(0)


def foreach_norms(tensors: list[Tensor]) -> list[Tensor]:
    """`torch._foreach_norm`, which refuses an empty list (a ZeRO rank may own no piece of a group)."""
    return list(torch._foreach_norm(tensors)) if tensors else []


def block_elements(device: torch.device, streams: int, element_size: int = 4) -> Optional[int]:
    """Elements per block so that `streams` tensors of a block fit the CPU's cache; None
    (no blocking) off the CPU."""
    if device.type != "cpu":
        return None
    if BLOCK_ELEMENTS:
        return BLOCK_ELEMENTS
    return max(CPU_L2_BYTES // (streams * element_size), 1 << 12)


def make_plan(numels: Sequence[int], layouts: Sequence[Optional[FlatLayout]], device: torch.device,
              block: Optional[int]) -> GroupPlan:
    """The plan for one group's tensors (`numels[i]` elements, `layouts[i]` from ZeRO or None for
    a whole parameter that is one local layer)."""
    groups = {id(lay.group): lay.group for lay in layouts if lay is not None and lay.group is not None}
    sharded = [lay is not None and lay.group is not None for lay in layouts]
    if len(groups) > 1 or (any(sharded) and not all(sharded)):
        raise ValueError("a parameter group mixes tensors reduced over different process groups (or none); "
                         "its per-layer norms cannot be reduced with one all-reduce")
    splits, chunk_layer, chunk_tensor, chunk_sizes, offset = [], [], [], [], 0
    for ti, (numel, layout) in enumerate(zip(numels, layouts)):
        segments = [(0, 0, numel)] if layout is None else sorted(layout.segments, key=lambda s: s[1])
        sizes, keep, cursor = [], [], 0
        for li, start, n in segments:
            if n <= 0:
                continue
            if start > cursor:
                sizes.append(start - cursor)
            step = n if block is None else block
            for s in range(start, start + n, step):
                keep.append(len(sizes))
                sizes.append(min(step, start + n - s))
                chunk_layer.append(offset + li)
                chunk_tensor.append(ti)
                chunk_sizes.append(sizes[-1])
            cursor = start + n
        if cursor < numel:
            sizes.append(numel - cursor)
        splits.append(None if sizes == [numel] and keep == [0] else (sizes, keep))
        offset += 1 if layout is None else layout.num_layers
    blocks = _consecutive(chunk_sizes, block)
    process_group = next(iter(groups.values()), None)
    if process_group is not None or block is None:
        # One unit: under ZeRO every rank reduces the group's sums, even with no piece of it.
        units = [Unit(0, len(chunk_sizes), (0, len(blocks)), offset, _index(chunk_layer, device), chunk_sizes,
                      process_group is None and chunk_layer == list(range(offset)))]
        return GroupPlan(splits, chunk_tensor, chunk_sizes, blocks, units, process_group, device, block is not None)
    # Units: runs of at most UNIT_BLOCKS blocks, cut only where a layer ends.
    units, b0 = [], 0
    for bi in range(len(blocks)):
        end = blocks[bi][1]
        if end == len(chunk_sizes) or (bi + 1 - b0 >= UNIT_BLOCKS and chunk_layer[end - 1] != chunk_layer[end]):
            start, layers = blocks[b0][0], chunk_layer[blocks[b0][0]:end]
            local = [li - layers[0] for li in layers]
            units.append(Unit(start, end, (b0, bi + 1), local[-1] + 1, _index(local, device), chunk_sizes[start:end],
                              local == list(range(len(local)))))
            b0 = bi + 1
    return GroupPlan(splits, chunk_tensor, chunk_sizes, blocks, units, None, device, True)


def _consecutive(sizes: list[int], block: Optional[int]) -> list[tuple[int, int]]:
    """[start, end) runs of `sizes` adding up to at most `block` (a larger item alone)."""
    runs, begin, total = [], 0, 0
    for i, n in enumerate(sizes):
        if block is not None and i > begin and total + n > block:
            runs.append((begin, i))
            begin, total = i, 0
        total += n
    if begin < len(sizes):
        runs.append((begin, len(sizes)))
    return runs


def _index(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


class Scratch:
    """One reusable buffer for an optimizer's temporaries (not part of its state): allocating
    them afresh every step costs page faults on the CPU."""

    def __init__(self):
        self._buffer: Optional[Tensor] = None

    def take(self, numel: int, like: Tensor) -> Tensor:
        """A flat view of `numel` elements of the buffer, on `like`'s device and dtype."""
        b = self._buffer
        if b is None or b.numel() < numel or b.device != like.device or b.dtype != like.dtype:
            b = self._buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return b[:numel]
