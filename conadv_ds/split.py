"""The split schedule: attacker ranks compute δ for future batches while trainer ranks update.

In one process ConAdv does the same work as DisAdv; the attack only stops costing wall-clock
time when it runs on other hardware at the same time (paper, Fig. 1b). With

    "conadv": {"schedule": "split", "attacker_ranks": 1, "staleness": 1}

the launch's ranks are divided: the trainer ranks form DeepSpeed's world (ZeRO 0-3, batch
arithmetic over the trainers only) and the attacker ranks never build a DeepSpeedEngine.

Layout (every ZeRO stage alike). `initialize` connects all launch ranks through the launcher's
TCPStore: a gloo side group over every rank carries δ, batches and weights, and the trainers
get a process group of their own, which becomes their default group, so that DeepSpeed (whose
ZeRO-3 set-up has world barriers) and the engine's metrics and checkpoints never see an
attacker. On trainers `RANK` and `WORLD_SIZE` are rewritten to the trainer world.

Protocol, per trainer step t (`Remote.prepare`), τ = staleness:

- the trainer pulls its micro-batches up to step t+τ (steps 0..τ at the first step) and sends
  every attacker a header, and its share of the live weights w_t: under ZeRO-3 its own
  `ds_tensor` shards, under ZeRO-0/1/2 (every trainer holds the full model) a 1/N slice of
  the concatenated parameters. The attacker assembles w_t from the N shares, so each trainer
  sends M/N bytes per attacker and step, nothing is gathered for it, and the copy sent is
  staged once, so the optimizer may update the weights while it is in flight;
- to the attacker that serves it, the trainer also sends the newly pulled micro-batches (the
  attacker sees exactly what the trainer trains on, from any data pipeline), its BatchNorm
  buffers and its modules' train/eval modes;
- the attacker computes δ for those steps with `Adversary` and the trainer's rank in the
  trainer world (the same `attack_seed` as in-process), from w_t = w_{s-τ} for step s = t+τ,
  and sends it with `isend`; the trainer posts `irecv` for it when it sends the job, so it
  only waits when the attack is slower than τ training steps.

δ therefore equals the in-process ConAdv δ with the same τ and seeds, and the trajectory is
the same. BatchNorm running statistics for an `attack_bn: "eval"` attack come with the same
stale step as the weights (as on the in-process lookahead path).

User loop: the same code runs on every rank. `initialize` returns a `SplitAttacker` on
attacker ranks, whose `train_batch(data_iter)` ignores `data_iter` and serves one trainer
step; call it until it raises StopIteration, which it does when the trainers' data ends or
they call `engine.stop_attackers()`. `engine.is_attacker` tells the two apart.
"""

from __future__ import annotations

import atexit
import io
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from . import batch as B
from .adversary import Adversary
from .config import CONADV_KEY, ConAdvConfig, load_json, parse_conadv, resolve_batch, with_overrides
from .errors import ConfigError
from .perturb import EmbeddingSpace, PixelSpace

_JOB, _STOP = 1, 2
_TAG_LAYOUT, _TAG_HEADER, _TAG_WEIGHTS, _TAG_PAYLOAD, _TAG_META, _TAG_DELTA = range(1, 7)
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_META_LEN = 10


# -- layout -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Which launch ranks attack and which train; attacker j serves a contiguous block of trainers."""

    launch_size: int
    attackers: tuple[int, ...]

    @property
    def trainers(self) -> tuple[int, ...]:
        return tuple(r for r in range(self.launch_size) if r not in self.attackers)

    def attacker_for(self, trainer: int) -> int:
        """The attacker rank that computes δ for a trainer (launch rank)."""
        i = self.trainers.index(trainer)
        return self.attackers[i * len(self.attackers) // len(self.trainers)]

    def served_by(self, attacker: int) -> tuple[int, ...]:
        return tuple(t for t in self.trainers if self.attacker_for(t) == attacker)


def _layout(attacker_ranks: Union[int, list[int], None], size: int) -> Layout:
    where = f"conadv.attacker_ranks={attacker_ranks!r}"
    if size < 2:
        raise ConfigError(f"conadv.schedule='split': needs at least 2 ranks (trainers + attackers), "
                          f"launched with world size {size}")
    if attacker_ranks is None or isinstance(attacker_ranks, int):
        count = 1 if attacker_ranks is None else attacker_ranks
        if count < 1:
            raise ConfigError(f"{where}: must be >= 1 (a count of ranks) or a list of rank ids")
        if count >= size:
            raise ConfigError(f"{where}: leaves no trainer rank in world size {size}; allowed: 1..{size - 1}")
        attackers = tuple(range(size - count, size))
    else:
        if not attacker_ranks:
            raise ConfigError(f"{where}: must name at least one rank")
        for r in attacker_ranks:
            if not 0 <= r < size:
                raise ConfigError(f"{where}: rank {r} out of range for world size {size}; allowed: 0..{size - 1}")
            if attacker_ranks.count(r) > 1:
                raise ConfigError(f"{where}: rank {r} listed twice")
        if len(attacker_ranks) >= size:
            raise ConfigError(f"{where}: leaves no trainer rank in world size {size}")
        attackers = tuple(sorted(attacker_ranks))
    layout = Layout(size, attackers)
    if len(attackers) > len(layout.trainers):
        raise ConfigError(f"{where}: {len(attackers)} attackers for {len(layout.trainers)} trainers; "
                          "allowed: at most one attacker per trainer")
    return layout


def plan(config: Union[str, os.PathLike, dict], overrides: Optional[dict] = None,
         launch_size: Optional[int] = None) -> Optional[Layout]:
    """The layout a DeepSpeed JSON asks for, checked before any process group exists: None unless
    its (overridden) `conadv` block has schedule 'split'. The batch arithmetic and ZeRO-3 group
    sizes are checked against the trainer count, which is DeepSpeed's world size. `launch_size`
    (default: this launch's) is the number of ranks started, attackers included."""
    ds = load_json(config)
    cfg = with_overrides(parse_conadv(ds.pop(CONADV_KEY, None)), overrides)
    if not (cfg.adversarial and cfg.schedule == "split"):
        return None
    if launch_size is None:
        launch_size = _LINK.layout.launch_size if _LINK is not None else _launch_size()
    layout = _layout(cfg.attacker_ranks, launch_size)
    n, size = len(layout.trainers), layout.launch_size
    try:
        resolve_batch(ds, n)
    except ConfigError as e:
        raise ConfigError(f"{e} (schedule 'split': the world size is the {n} trainer ranks of {size})") from None
    zero = ds.get("zero_optimization")
    hpz = zero.get("zero_hpz_partition_size", 1) if isinstance(zero, dict) and zero.get("stage") == 3 else 1
    if isinstance(hpz, int) and 1 < hpz < n and n % hpz:
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size={hpz}: must divide the {n} trainer ranks "
                          f"(schedule 'split' with {len(layout.attackers)} attacker ranks of {size})")
    return layout


def _launch_size() -> int:
    import torch.distributed as dist

    if dist.is_initialized():
        raise ConfigError("conadv.schedule='split': torch.distributed is already initialized; let "
                          "conadv_ds.initialize create the process groups (the trainer ranks get a world of their own)")
    return int(os.environ.get("WORLD_SIZE", "1"))


# -- process groups ---------------------------------------------------------------------------
@dataclass
class Link:
    """This process's place in a split launch: its launch rank and the side group over all ranks."""

    layout: Layout
    rank: int
    side: Any
    session: Optional[Union["Remote", "SplitAttacker"]] = field(default=None, repr=False)

    @property
    def is_attacker(self) -> bool:
        return self.rank in self.layout.attackers

    def begin(self, session: Union["Remote", "SplitAttacker"]) -> None:
        """Make `session` the one using the side group, after the previous one has finished its traffic."""
        if self.session is not None:
            self.session.close()
        self.session = session


_LINK: Optional[Link] = None


def connect(layout: Layout) -> Link:
    """Create the side group and the trainers' own world from the launcher's store (once per process)."""
    global _LINK
    if _LINK is not None:
        if _LINK.layout != layout:
            raise ConfigError(f"conadv.attacker_ranks: this process already runs the split layout with attackers "
                              f"{list(_LINK.layout.attackers)}; got {list(layout.attackers)}")
        return _LINK
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from torch.distributed.constants import default_pg_timeout

    store, rank, _ = next(dist.rendezvous("env://"))
    side = dist.ProcessGroupGloo(dist.PrefixStore("conadv_split/side", store), rank, layout.launch_size,
                                 default_pg_timeout)
    if rank in layout.trainers:
        index, n = layout.trainers.index(rank), len(layout.trainers)
        os.environ.update(RANK=str(index), WORLD_SIZE=str(n))
        dist.init_process_group(get_accelerator().communication_backend_name(),
                                store=dist.PrefixStore("conadv_split/trainers", store), rank=index, world_size=n,
                                timeout=default_pg_timeout)
    _LINK = Link(layout, rank, side)
    atexit.register(lambda: _LINK.session.close() if _LINK.session is not None else None)
    return _LINK


def current_link() -> Link:
    if _LINK is None:
        raise ConfigError("conadv.schedule='split': the process groups are missing; create the engine with "
                          "conadv_ds.initialize, which sets up the attacker ranks")
    return _LINK


# -- messages ---------------------------------------------------------------------------------
class _Outbox:
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
        data = _dumps(obj)
        self.send(torch.tensor([data.numel()], dtype=torch.int64), dst, tag)
        self.send(data, dst, tag)

    def wait(self, works: list[Any] = (), before: Optional[int] = None) -> None:
        """Wait for the given sends and for those labelled below `before`; None: for all."""
        ids = {id(w) for w in works}
        done = [(w, before is None or label < before or id(w) in ids) for label, w, _ in self.posted]
        for w, wait in done:
            if wait:
                w.wait()
        self.posted = [entry for entry, (_, wait) in zip(self.posted, done) if not wait]

    def drain(self) -> None:
        self.wait()


def _dumps(obj: Any) -> Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def _loads(data: Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


def _recv(side, tensor: Tensor, src: int, tag: int) -> Tensor:
    side.recv([tensor], src, tag).wait()
    return tensor


def _recv_object(side, src: int, tag: int, length: Optional[int] = None) -> Any:
    if length is None:
        length = int(_recv(side, torch.zeros(1, dtype=torch.int64), src, tag))
    return _loads(_recv(side, torch.empty(length, dtype=torch.uint8), src, tag))


def _delta_key(space: Union[PixelSpace, EmbeddingSpace], part: B.Batch) -> Tensor:
    """The input whose shape δ's leading dimensions share (pixels, or token ids)."""
    return part[space.input_key] if B.is_dict(part) else part[0]


# -- weights ----------------------------------------------------------------------------------
Piece = tuple[int, int, int, int]
"""(parameter index, offset in the trainer's local flat tensor, offset in the parameter's padded
flat tensor on the attacker, length)."""


def _own_pieces(params: list[nn.Parameter], zero3: bool, index: int, count: int) -> list[Piece]:
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


class _AssembledWeights:
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


# -- trainer side -----------------------------------------------------------------------------
@dataclass
class _Step:
    """Micro-batches of one future step and their δ (received, in flight, or not yet posted)."""

    batches: list[B.Batch]
    deltas: list[Optional[Tensor]] = field(default_factory=list)
    works: list[Any] = field(default_factory=list)
    sent: bool = False


class Remote:
    """The trainer's schedule under split: same `prepare(step, pull, source) -> [(batch, δ)]` as
    the schedules in `schedule.py`, with δ computed on an attacker rank (see the module text)."""

    def __init__(self, engine, space: Union[PixelSpace, EmbeddingSpace], staleness: int):
        self.link = current_link()
        layout = self.link.layout
        self.tau, self.space = staleness, space
        self.module, self.device = engine.module, engine.device
        self.params = list(self.module.parameters())
        self.zero3 = engine.zero_optimization_stage() == 3
        self.attacker = layout.attacker_for(self.link.rank)
        self.queue: dict[int, _Step] = {}
        self.outbox = _Outbox(self.link.side)
        self.spec: Optional[tuple[tuple[int, ...], torch.dtype]] = None
        """δ's trailing shape (after the key input's) and dtype, learnt from the attacker's first message."""
        self.last_wait = 0.0
        """Seconds the last `prepare` waited for δ: 0 when the attacker keeps up."""
        self._warned = False
        self.stopped = False
        self.weight_sends: list[Any] = []
        self.staged: list[Tensor] = []
        self.sent_step = 0
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ConfigError(f"conadv.schedule='split': the model's parameters have several dtypes "
                              f"{sorted(map(str, dtypes))}; one is needed to stream them to the attackers")
        self.pieces = _own_pieces(self.params, self.zero3, layout.trainers.index(self.link.rank), len(layout.trainers))
        self.link.begin(self)
        for a in layout.attackers:
            self.outbox.send_object({"pieces": [list(p) for p in self.pieces], "dtype": self.params[0].dtype,
                                     "count": len(self.params)}, a, _TAG_LAYOUT)

    def _local(self, i: int) -> Tensor:
        p = self.params[i]
        return (p.ds_tensor if self.zero3 else p.data).reshape(-1)

    def _weight_pieces(self) -> list[Tensor]:
        """This trainer's share of the live weights, piece by piece: on the CPU views of the
        parameters themselves (no copy; `before_update` keeps the optimizer from changing them
        while they are sent), elsewhere CPU copies."""
        return [self._local(i)[lo:lo + n].cpu() for i, lo, _, n in self.pieces]

    def before_update(self) -> None:
        """Called by the engine before the optimizer changes the weights: waits until the shares
        of w_t sent at the start of this step have left (they have, unless the attacker is still
        busy with an earlier step). The attackers then hold this step's header and every message
        of earlier steps, so those sends are released too."""
        self.outbox.wait(self.weight_sends, before=self.sent_step)
        self.weight_sends, self.staged = [], []

    def _send_job(self, step: int, new: list[int]) -> None:
        self.before_update()  # a step that ended without an update (an exception) left its sends pending
        weights = self._weight_pieces()
        self.sent_step = step
        self.staged = [] if self.device.type == "cpu" else weights
        for a in self.link.layout.attackers:
            payload = None
            if a == self.attacker and new:
                payload = _dumps({
                    "steps": new,
                    "batches": [[B.to_device(b, torch.device("cpu")) for b in self.queue[s].batches] for s in new],
                    "buffers": [b.detach().cpu() for b in self.module.buffers()],
                    "modes": [m.training for m in self.module.modules()]})
            length = 0 if payload is None else payload.numel()
            self.outbox.send(torch.tensor([_JOB, step, length], dtype=torch.int64), a, _TAG_HEADER, step)
            self.weight_sends += [self.outbox.send(piece, a, _TAG_WEIGHTS, step) for piece in weights]
            if payload is not None:
                self.outbox.send(payload, a, _TAG_PAYLOAD, step)
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
                    key = _delta_key(self.space, self.space.adversarial_part(b))
                    st.deltas[m] = torch.empty((*key.shape, *trailing), dtype=dtype)
                    st.works[m] = self.link.side.recv([st.deltas[m]], self.attacker, _TAG_DELTA)

    def _learn_spec(self) -> None:
        meta = _recv(self.link.side, torch.zeros(_META_LEN, dtype=torch.int64), self.attacker, _TAG_META).tolist()
        self.spec = (tuple(meta[2:2 + meta[0]]), _DTYPES[meta[1]])
        self._post_receives()

    def prepare(self, step: int, pull: Callable[[], list[B.Batch]], source: object) -> list[tuple[B.Batch, Tensor]]:
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
                          "across epochs for exact staleness.")
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
        return [(b, d.to(self.device)) for b, d in zip(current.batches, current.deltas)]

    def stop(self, step: int) -> None:
        """Tell the attackers that the trainers take no step from `step` on (once)."""
        if self.stopped:
            return
        self.close()
        for a in self.link.layout.attackers:
            self.outbox.send(torch.tensor([_STOP, step, 0], dtype=torch.int64), a, _TAG_HEADER)
        self.outbox.drain()
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
        self.outbox.drain()

    def extra_bytes(self) -> int:
        """Bytes of weight copies held for the attackers: none on the CPU (the parameters are sent
        as they are), this trainer's CPU-staged share on other devices."""
        return sum(t.numel() * t.element_size() for t in self.staged)

    def state_dict(self) -> dict:
        """The micro-batches pulled ahead with their δ (waited for): a resumed run trains them
        without recomputing, and its attacker resumes from the current weights."""
        self.close()
        return {"steps": {s: [(b, d) for b, d in zip(st.batches, st.deltas)] for s, st in self.queue.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.queue = {s: _Step([b for b, _ in pairs], [d for _, d in pairs], [None] * len(pairs), sent=True)
                      for s, pairs in state["steps"].items()}


# -- attacker side ----------------------------------------------------------------------------
class SplitAttacker:
    """What `conadv_ds.initialize` returns on an attacker rank: holds the stale weights and serves
    one trainer step per `train_batch` call; it never builds a DeepSpeed engine."""

    is_attacker = True

    def __init__(self, model: nn.Module, space: Union[PixelSpace, EmbeddingSpace], cfg: ConAdvConfig,
                 ds_config: dict, loss_fn: Optional[B.LossFn] = None):
        from deepspeed.accelerator import get_accelerator

        self.link = current_link()
        layout = self.link.layout
        self.device = torch.device(get_accelerator().current_device_name())
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ConfigError("conadv.schedule='split': the model on an attacker rank was built under "
                              "deepspeed.zero.Init; build it as a plain module there")
        self.module = model.to(self.device)
        self.space = space
        self.trainers = layout.served_by(self.link.rank)
        autocast = _autocast(ds_config)
        self.adversaries = {t: Adversary(self.module, space, cfg, loss_fn or B.default_loss,
                                         rank=layout.trainers.index(t), autocast=autocast) for t in self.trainers}
        self.outbox = _Outbox(self.link.side)
        self.link.begin(self)
        self.weights = _AssembledWeights(self.module, [_recv_object(self.link.side, t, _TAG_LAYOUT)
                                                       for t in layout.trainers], self.device)
        self._described: set[int] = set()
        self.global_steps = 0
        """Trainer steps served (the trainers' `global_steps` after the same step)."""

    def train_batch(self, data_iter: Optional[Iterator] = None) -> dict[str, float]:
        """Serve one trainer step: receive w_t and the batches of step t+τ, send their δ.

        `data_iter` is not read (the trainers send their batches). Returns `step` (the trainers'
        `global_steps` after the step served, as in their metrics), seconds spent waiting for the
        trainers and attacking. Raises StopIteration when the
        trainers' data has ended."""
        side, layout = self.link.side, self.link.layout
        start = time.perf_counter()
        headers = {t: torch.zeros(3, dtype=torch.int64) for t in layout.trainers}
        for w in [side.recv([h], t, _TAG_HEADER) for t, h in headers.items()]:
            w.wait()
        heads = {t: h.tolist() for t, h in headers.items()}
        kinds, steps = {h[0] for h in heads.values()}, {h[1] for h in heads.values()}
        if len(kinds) != 1 or len(steps) != 1:
            raise RuntimeError(f"conadv split: trainers out of step: {heads}")
        step = steps.pop()
        if kinds.pop() == _STOP:
            raise StopIteration
        payloads = {t: torch.empty(heads[t][2], dtype=torch.uint8) for t in self.trainers if heads[t][2] > 0}
        works = [side.recv([piece], t, _TAG_WEIGHTS) for k, t in enumerate(layout.trainers)
                 for piece in self.weights.targets(k)]
        works += [side.recv([buf], t, _TAG_PAYLOAD) for t, buf in payloads.items()]
        for w in works:
            w.wait()
        self.weights.unpack()
        jobs = {t: _loads(buf) for t, buf in payloads.items()}
        attack_start = time.perf_counter()
        for t, job in jobs.items():
            self._attack(t, job)
        self.outbox.drain()
        end = time.perf_counter()
        self.global_steps = step + 1
        return {"step": float(step + 1), "wait_seconds": attack_start - start, "attack_seconds": end - attack_start}

    def _attack(self, trainer: int, job: dict) -> None:
        for b, saved in zip(self.module.buffers(), job["buffers"]):
            b.data = saved.to(self.device)
        for m, mode in zip(self.module.modules(), job["modes"]):
            m.training = mode
        for s, batches in zip(job["steps"], job["batches"]):
            for micro, batch in enumerate(batches):
                batch = B.to_device(batch, self.device)
                delta = self.adversaries[trainer](batch, s, micro).detach().cpu().contiguous()
                if trainer not in self._described:
                    trailing = delta.shape[_delta_key(self.space, self.space.adversarial_part(batch)).dim():]
                    meta = [len(trailing), _DTYPES.index(delta.dtype), *trailing]
                    self.outbox.send(torch.tensor(meta + [0] * (_META_LEN - len(meta)), dtype=torch.int64),
                                     trainer, _TAG_META)
                    self._described.add(trainer)
                self.outbox.send(delta, trainer, _TAG_DELTA)

    def close(self) -> None:
        self.outbox.drain()

    def save_checkpoint(self, save_dir: str, *args: Any, **kwargs: Any) -> bool:
        """Nothing to write: an attacker's state (the stale weights, the batches ahead) is sent
        anew by the trainers every step, and their checkpoints hold the δ already computed.
        Present so that the same loop runs on every rank."""
        return True

    def load_checkpoint(self, load_dir: str, *args: Any, **kwargs: Any) -> tuple[None, dict]:
        """See `save_checkpoint`: a resumed attacker starts from the weights the trainers send."""
        return None, {}

    def stale_bytes(self) -> int:
        """Bytes this rank holds for the stale weights (assembled model and receive buffers)."""
        return self.weights.nbytes()


def _autocast(ds_config: dict) -> Callable[[], Any]:
    """The attack forward's autocast: the one DeepSpeed's `torch_autocast` block sets on trainers."""
    from contextlib import nullcontext

    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import get_torch_autocast_dtype, get_torch_autocast_enabled

    if not get_torch_autocast_enabled(ds_config):
        return nullcontext
    dtype = get_torch_autocast_dtype(ds_config)
    return lambda: torch.autocast(device_type=get_accelerator().device_name(), dtype=dtype, enabled=True)
