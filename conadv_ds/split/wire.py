"""What crosses the side group between trainers and attackers, encoded and decoded here only.

Messages per trainer step (tags below): a header `[kind, step, payload length]` to every
attacker; this trainer's weight share (see `shares.py`); to the attacker serving it, a payload
with the newly pulled micro-batches, BatchNorm buffers and module modes. Back, once per trainer,
δ's trailing shape and dtype (`spec`), then δ for every micro-batch in step order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

JOB, STOP = 1, 2
TAG_LAYOUT, TAG_HEADER, TAG_WEIGHTS, TAG_PAYLOAD, TAG_SPEC, TAG_DELTA = range(1, 7)
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_SPEC_LEN = 10
HEADER_LEN = 3


@dataclass(frozen=True)
class Header:
    kind: int
    """JOB: weights (and maybe a payload) follow; STOP: the trainers take no more steps."""
    step: int
    payload_len: int


def encode_header(kind: int, step: int, payload_len: int = 0) -> Tensor:
    return torch.tensor([kind, step, payload_len], dtype=torch.int64)


def decode_header(t: Tensor) -> Header:
    return Header(*t.tolist())


def encode_spec(trailing: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """δ's shape after the key input's dimensions, and its dtype."""
    meta = [len(trailing), _DTYPES.index(dtype), *trailing]
    return torch.tensor(meta + [0] * (_SPEC_LEN - len(meta)), dtype=torch.int64)


def empty_spec() -> Tensor:
    return torch.zeros(_SPEC_LEN, dtype=torch.int64)


def decode_spec(t: Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    meta = t.tolist()
    return tuple(meta[2:2 + meta[0]]), _DTYPES[meta[1]]


def encode_job(steps: list[int], batches: list[list[Any]], buffers: list[Tensor], modes: list[bool]) -> Tensor:
    """The payload of a job: the micro-batches of `steps` and the module state the attack needs."""
    return dumps({"steps": steps, "batches": batches, "buffers": buffers, "modes": modes})


def decode_job(data: Tensor) -> dict:
    return loads(data)


def dumps(obj: Any) -> Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def loads(data: Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


def recv(side, tensor: Tensor, src: int, tag: int) -> Tensor:
    side.recv([tensor], src, tag).wait()
    return tensor


def recv_object(side, src: int, tag: int, length: Optional[int] = None) -> Any:
    if length is None:
        length = int(recv(side, torch.zeros(1, dtype=torch.int64), src, tag))
    return loads(recv(side, torch.empty(length, dtype=torch.uint8), src, tag))


class Outbox:
    """Posted sends and the tensors they read, kept alive until waited for. Each send is waited
    for exactly once (gloo counts completions: a second wait would block), and only once its
    receiver is known to have posted the receive, so that waiting never blocks for long."""

    def __init__(self, side):
        self.side = side
        self.posted: list[tuple[int, Any, Tensor]] = []
        """(label, work, tensor): the label is the trainer step that sent it (-1: set-up)."""

    def send(self, tensor: Tensor, dst: int, tag: int, label: int = -1) -> Any:
        work = self.side.send([tensor], dst, tag)
        self.posted.append((label, work, tensor))
        return work

    def send_object(self, obj: Any, dst: int, tag: int) -> None:
        """Send `obj` (tensors, lists, dicts, numbers) as bytes after its length."""
        data = dumps(obj)
        self.send(torch.tensor([data.numel()], dtype=torch.int64), dst, tag)
        self.send(data, dst, tag)

    def wait(self, before: Optional[int] = None) -> None:
        """Wait for the sends labelled below `before`; None: for all."""
        done = [(w, before is None or label < before) for label, w, _ in self.posted]
        for w, wait in done:
            if wait:
                w.wait()
        self.posted = [entry for entry, (_, wait) in zip(self.posted, done) if not wait]
