"""Which slice of the weights each trainer sends, and how an attacker assembles them.

Under ZeRO-3 a trainer sends its own `ds_tensor` shard of every parameter; under ZeRO-0/1/2
(every trainer holds the full model) a 1/N slice of the concatenated parameters. Each trainer
thus sends M/N bytes per attacker and step and nothing is gathered for it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError

Piece = tuple[int, int, int, int]
"""(parameter index, offset in the trainer's local flat tensor, offset in the parameter's padded
flat tensor on the attacker, length)."""


def own_pieces(params: list[nn.Parameter], zero3: bool, index: int, count: int) -> list[Piece]:
    """The share of the weights that trainer `index` of `count` sends each step."""
    if zero3:  # its own ZeRO-3 shard of every parameter; the last shard carries DeepSpeed's padding
        return [(i, 0, index * p.ds_tensor.numel(), p.ds_tensor.numel()) for i, p in enumerate(params)]
    total = sum(p.numel() for p in params)
    chunk = -(-total // count)
    lo, hi = index * chunk, min((index + 1) * chunk, total)
    pieces, start = [], 0
    for i, p in enumerate(params):
        a, b = max(lo, start), min(hi, start + p.numel())
        if a < b:
            pieces.append((i, a - start, a - start, b - a))
        start += p.numel()
    return pieces


class AssembledWeights:
    """On an attacker: the module's parameters as views of per-parameter flat tensors that the
    trainers' shares are received into each step (directly on the CPU; through a CPU inbox
    copied to the device otherwise)."""

    def __init__(self, module: nn.Module, layouts: list[dict], device: torch.device):
        self.params = list(module.parameters())
        self.layouts = layouts
        dtype = layouts[0]["dtype"]
        padded = [p.numel() for p in self.params]
        for lay in layouts:
            if lay["dtype"] != dtype or lay["count"] != len(self.params):
                raise ConfigError("conadv.schedule='split': the attacker's model does not match the trainers' "
                                  f"({len(self.params)} parameters here, {lay['count']} there); build the same "
                                  "model on every rank, outside deepspeed.zero.Init")
            for i, _, off, n in lay["pieces"]:
                padded[i] = max(padded[i], off + n)
        self.flat = [torch.empty(n, dtype=dtype, device=device) for n in padded]
        for p, flat in zip(self.params, self.flat):
            p.data = flat[:p.numel()].view(p.shape)
        self.inbox = None if device.type == "cpu" else \
            [torch.empty(sum(n for *_, n in lay["pieces"]), dtype=dtype) for lay in layouts]

    def targets(self, trainer: int) -> list[Tensor]:
        """Where the pieces of trainer `trainer` (its index among the trainers) are received, in order."""
        pieces = self.layouts[trainer]["pieces"]
        if self.inbox is None:
            return [self.flat[i][off:off + n] for i, _, off, n in pieces]
        return list(self.inbox[trainer].split([n for *_, n in pieces]))

    def unpack(self) -> None:
        """Copy received shares from the CPU inbox into the parameters (device models only)."""
        if self.inbox is None:
            return
        with torch.no_grad():
            for trainer, lay in enumerate(self.layouts):
                for (i, _, off, n), piece in zip(lay["pieces"], self.targets(trainer)):
                    self.flat[i][off:off + n].copy_(piece, non_blocking=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat + (self.inbox or []))
