"""The trainer side of schedule 'split': a schedule whose δ comes from an attacker rank."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import batch as B
from ..errors import ConfigError
from ..perturb import Space
from ..stale import tensor_bytes
from . import wire
from .link import current_link
from .shares import own_pieces


@dataclass
class _Step:
    """Micro-batches of one future step and their δ (received, in flight, or not yet posted)."""

    batches: list[B.Batch]
    deltas: list[Optional[Tensor]] = field(default_factory=list)
    works: list[Any] = field(default_factory=list)
    sent: bool = False


class Remote:
    """The trainer's schedule under split: the `schedule.Schedule` protocol, with δ computed on an
    attacker rank (see the package text)."""

    def __init__(self, engine, space: Space, staleness: int):
        self.link = current_link()
        layout = self.link.layout
        self.tau, self.space = staleness, space
        self.module, self.device = engine.module, engine.device
        self.params = list(self.module.parameters())
        self.zero3 = engine.zero_optimization_stage() == 3
        self.attacker = layout.attacker_for(self.link.rank)
        self.queue: dict[int, _Step] = {}
        self.outbox = wire.Outbox(self.link.side)
        self.spec: Optional[tuple[tuple[int, ...], torch.dtype]] = None
        """δ's trailing shape (after the key input's) and dtype, learnt from the attacker's first message."""
        self.last_wait = 0.0
        """Seconds the last `prepare` waited for δ: 0 when the attacker keeps up."""
        self._warned = False
        self.stopped = False
        self.staging: dict[int, list[Tensor]] = {}
        """Host copies of the weight share sent at each step, while their sends may be in flight."""
        self.free: list[list[Tensor]] = []
        """Copies whose sends were waited for (`_release`): the only ones reused."""
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ConfigError(f"conadv.schedule='split': the model's parameters have several dtypes "
                              f"{sorted(map(str, dtypes))}; one is needed to stream them to the attackers")
        self.pieces = own_pieces(self.params, self.zero3, layout.trainers.index(self.link.rank), len(layout.trainers))
        self.link.begin(self)
        for a in layout.attackers:
            self.outbox.send_object({"pieces": [list(p) for p in self.pieces], "dtype": self.params[0].dtype,
                                     "count": len(self.params)}, a, wire.TAG_LAYOUT)

    def _local(self, i: int) -> Tensor:
        p = self.params[i]
        return (p.ds_tensor if self.zero3 else p.data).reshape(-1)

    def _weight_pieces(self, step: int) -> list[Tensor]:
        """This trainer's share of the live weights, piece by piece, copied into host buffers that
        are reused once their sends were waited for (at most τ + 1 sets): the sends read the copies,
        so the optimizer updates the weights while they are in flight and the trainer never waits
        for them. On an accelerator each piece is a blocking device-to-host copy (gloo sends from
        host memory): the schedule's transport, once per step."""
        buffers = self.free.pop() if self.free else \
            [torch.empty(n, dtype=self.params[i].dtype) for i, _, _, n in self.pieces]
        for b, (i, lo, _, n) in zip(buffers, self.pieces):
            b.copy_(self._local(i)[lo:lo + n])
        self.staging[step] = buffers
        return buffers

    def _send_job(self, step: int, new: list[int]) -> None:
        weights = self._weight_pieces(step)
        for a in self.link.layout.attackers:
            payload = None
            if a == self.attacker and new:
                # gloo sends from host memory: the new micro-batches and the BatchNorm buffers are
                # copied to the host once per step (on an accelerator, blocking copies, one per
                # tensor: with the weights, the schedule's device-to-host transport)
                cpu = torch.device("cpu")
                payload = wire.encode_job(new, [[B.to_device(b, cpu) for b in self.queue[s].batches] for s in new],
                                          [b.detach().cpu() for b in self.module.buffers()],
                                          [m.training for m in self.module.modules()])
            length = 0 if payload is None else payload.numel()
            self.outbox.send(wire.encode_header(wire.JOB, step, length), a, wire.TAG_HEADER, step)
            for piece in weights:
                self.outbox.send(piece, a, wire.TAG_WEIGHTS, step)
            if payload is not None:
                self.outbox.send(payload, a, wire.TAG_PAYLOAD, step)
        for s in new:
            self.queue[s].sent = True
            self.queue[s].deltas = [None] * len(self.queue[s].batches)
            self.queue[s].works = [None] * len(self.queue[s].batches)

    def _post_receives(self) -> None:
        """irecv for every sent micro-batch without one, in step order (the attacker's send order)."""
        if self.spec is None:
            return
        trailing, dtype = self.spec
        for s in sorted(self.queue):
            st = self.queue[s]
            if not st.sent:
                continue
            for m, b in enumerate(st.batches):
                if st.deltas[m] is None:
                    key = self.space.delta_shape_key(self.space.adversarial_part(b))
                    st.deltas[m] = torch.empty((*key.shape, *trailing), dtype=dtype)
                    st.works[m] = self.link.side.recv([st.deltas[m]], self.attacker, wire.TAG_DELTA)

    def _learn_spec(self) -> None:
        self.spec = wire.decode_spec(wire.recv(self.link.side, wire.empty_spec(), self.attacker, wire.TAG_SPEC))
        self._post_receives()

    def prepare(self, step: int, pull: Callable[[], list[B.Batch]]) -> list[tuple[B.Batch, Tensor]]:
        if self.stopped:
            raise StopIteration  # the attackers have left; no δ can come
        if self.queue and min(self.queue) != step:
            raise RuntimeError(f"conadv split: step {step} requested while steps {sorted(self.queue)} are pending: "
                               "steps must be taken in order")
        last = max(self.queue) if self.queue else step - 1
        for s in range(last + 1, step + self.tau + 1):
            try:
                self.queue[s] = _Step(pull())
            except StopIteration:
                break
        if step not in self.queue:
            self.stop(step)
            raise StopIteration
        new = [s for s in sorted(self.queue) if not self.queue[s].sent]
        if step > 0 and any(s != step + self.tau for s in new) and not self._warned:
            warnings.warn("conadv split: steps pulled without their predecessors' state (new data iterator or a "
                          "resume without conadv state) are attacked with the current weights. Keep one iterator "
                          "across epochs for exact staleness.", stacklevel=3)
            self._warned = True
        self._send_job(step, new)
        self._post_receives()
        start = time.perf_counter()
        if self.spec is None:
            self._learn_spec()
        current = self.queue.pop(step)
        for w in current.works:
            if w is not None:
                w.wait()
        self.last_wait = time.perf_counter() - start
        # δ of `step` was computed from the weights sent at step - τ: the attacker holds every
        # message of that step and before, so their sends are waited for without blocking
        self._release(before=step - self.tau + 1)
        return [(b, d.to(self.device)) for b, d in zip(current.batches, current.deltas)]

    def _release(self, before: Optional[int] = None) -> None:
        """Wait for the sends of the steps below `before` (None: all), then free their weight copies."""
        self.outbox.wait(before=before)
        for s in [s for s in self.staging if before is None or s < before]:
            self.free.append(self.staging.pop(s))

    def stop(self, step: int) -> None:
        """Tell the attackers that the trainers take no step from `step` on (once)."""
        if self.stopped:
            return
        self.close()
        for a in self.link.layout.attackers:
            self.outbox.send(wire.encode_header(wire.STOP, step), a, wire.TAG_HEADER)
        self.outbox.wait()
        self.stopped = True

    def close(self) -> None:
        """Wait until the attacker has every job and the δ of every step sent for, so that no
        message of this run is left in flight (called before a new session and at exit)."""
        if self.spec is None and any(st.sent for st in self.queue.values()):
            self._learn_spec()
        for st in self.queue.values():
            for w in st.works:
                if w is not None:
                    w.wait()
            st.works = [None] * len(st.works)
        self._release()

    def extra_bytes(self) -> int:
        """Bytes held for the attackers and from them: the host copies of the weight share (up to
        τ + 1 sets), and the micro-batches pulled ahead with the δ received for them."""
        return tensor_bytes([*self.staging.values(), *self.free]) + \
            tensor_bytes([(st.batches, st.deltas) for st in self.queue.values()])

    def state_dict(self) -> dict:
        """The micro-batches pulled ahead with their δ (waited for): a resumed run trains them
        without recomputing, and its attacker resumes from the current weights."""
        self.close()
        return {"steps": {s: [(b, d) for b, d in zip(st.batches, st.deltas)] for s, st in self.queue.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.queue = {s: _Step([b for b, _ in pairs], [d for _, d in pairs], [None] * len(pairs), sent=True)
                      for s, pairs in state["steps"].items()}



    def attack_micro(self, step: int, micro: int, batch: B.Batch, last: bool) -> Optional[Tensor]:
        raise TypeError("schedule 'split' needs whole steps (conadv_ds.initialize)")
