"""When each batch is attacked, and with which weights.

A schedule turns "the micro-batches of step t" into `[(batch, δ or None), ...]`:

- `Clean`: no attack.
- `DisAdv`: δ_t from the current weights w_t, computed before the update.
- `Lookahead` (ConAdv, τ = 1): while step t runs, the next step's batches are pulled and
  attacked with w_t, which is in place anyway, so no weights are ever copied.
- `Snapshot` (ConAdv, any τ): δ_t from w_{max(t-τ, 0)}, each rank keeping its own shard of
  the last τ weight versions (see `stale.py`).
- `split.trainer.Remote` (ConAdv on attacker ranks): δ_t computed elsewhere from w_{t-τ}.

Loops that own whole steps call `prepare`; loops that hand over one micro-batch at a time
(the Hugging Face Trainer) call `attack_micro`. `build_schedule` is the one place that picks.
"""

from __future__ import annotations

import collections
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Protocol

from torch import Tensor, nn

from . import batch as B
from .adversary import Adversary
from .config import ConAdvConfig
from .errors import ConfigError
from .perturb import Space
from .stale import Snapshot as WeightSnapshot
from .stale import stale_weights_for, tensor_bytes

Attack = Callable[[B.Batch, int, int], Tensor]
"""attack(batch, step, micro) -> δ, with whatever weights are in the model."""
Prepared = list[tuple[B.Batch, Optional[Tensor]]]


@dataclass(frozen=True)
class Pull:
    """The next step's micro-batches (`pull()`; StopIteration when the data ends), and the
    iterator they come from (`source`), so that batches pulled ahead stay with their iterator."""

    next_step: Callable[[], list[B.Batch]]
    source: object = None

    def __call__(self) -> list[B.Batch]:
        return self.next_step()


class Schedule(Protocol):
    def prepare(self, step: int, pull: Pull) -> Prepared:
        """The micro-batches of step `step` with their δ (None: not attacked)."""

    def attack_micro(self, step: int, micro: int, batch: B.Batch, last: bool) -> Optional[Tensor]:
        """δ for micro-batch `micro` of step `step`, handed over alone; `last` on the step's final one."""

    def stop(self, step: int) -> None:
        """Training ends at `step`: release whatever serves the schedule (attacker ranks)."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold to continue the schedule exactly."""

    def load_state_dict(self, state: dict) -> None: ...

    def extra_bytes(self) -> int:
        """Bytes this rank holds beyond a plain step: old weights, and batches and δ pulled ahead."""


class Clean:
    def prepare(self, step: int, pull: Pull) -> Prepared:
        return [(b, None) for b in pull()]

    def attack_micro(self, step: int, micro: int, batch: B.Batch, last: bool) -> Optional[Tensor]:
        return None

    def stop(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def extra_bytes(self) -> int:
        return 0


class DisAdv(Clean):
    def __init__(self, attack: Attack):
        self.attack = attack

    def prepare(self, step: int, pull: Pull) -> Prepared:
        return [(b, self.attack(b, step, i)) for i, b in enumerate(pull())]

    def attack_micro(self, step: int, micro: int, batch: B.Batch, last: bool) -> Optional[Tensor]:
        return self.attack(batch, step, micro)


class Lookahead(DisAdv):
    """τ = 1 without a weight copy. The pending batches belong to the iterator they came from:
    a different iterator starts afresh (that one step is then attacked with w_t), and so does
    a step after the iterator ran dry; either is warned about once."""

    def __init__(self, attack: Attack):
        super().__init__(attack)
        self.pending: Optional[tuple[int, object, Prepared]] = None
        self._dry_after: Optional[int] = None
        """The step after which the data iterator had nothing more to pull ahead."""
        self._warned = False

    def attack_micro(self, step: int, micro: int, batch: B.Batch, last: bool) -> Optional[Tensor]:
        raise TypeError("lookahead needs whole steps; build_schedule(whole_steps=False) picks a snapshot")

    def state_dict(self) -> dict:
        return {"pending": None if self.pending is None else (self.pending[0], self.pending[2])}

    def load_state_dict(self, state: dict) -> None:
        """Restored batches are taken by whichever iterator comes next (source None)."""
        pending = state["pending"]
        self.pending = None if pending is None else (pending[0], None, pending[1])

    def extra_bytes(self) -> int:
        return 0 if self.pending is None else tensor_bytes(self.pending[2])

    def _warn_once(self, step: int, why: str) -> None:
        if not self._warned:
            warnings.warn(f"conadv lookahead: {why}, so step {step} was attacked with the current weights "
                          "(DisAdv), not the previous step's. Pass one iterator that lasts across steps and "
                          "epochs, e.g. engine.train_batch(it) with it = iter(deepspeed.utils.RepeatingLoader("
                          "loader)) made once, or initialize(training_data=...) and train_batch().", stacklevel=4)
            self._warned = True

    def prepare(self, step: int, pull: Pull) -> Prepared:
        p = self.pending
        if p is not None and p[0] == step and (p[1] is None or p[1] is pull.source):
            current = p[2]
        else:
            if p is not None and step > 0:
                self._warn_once(step, "a new data iterator took over from the one the next batches were pulled "
                                      "from")
            elif self._dry_after == step - 1:
                self._warn_once(step, f"the data iterator of step {step - 1} had no further batches to pull ahead")
            current = super().prepare(step, pull)
        self.pending, self._dry_after = None, None
        try:
            upcoming = pull()
        except StopIteration:
            self._dry_after = step
            return current
        self.pending = (step + 1, pull.source, [(b, self.attack(b, step + 1, i)) for i, b in enumerate(upcoming)])
        return current


class Snapshot(DisAdv):
    """δ_t from w_{max(t-τ, 0)}; keeps at most τ shard snapshots."""

    def __init__(self, attack: Attack, staleness: int, stale):
        super().__init__(attack)
        self.tau, self.stale = staleness, stale
        self.history: collections.OrderedDict[int, WeightSnapshot] = collections.OrderedDict()

    def prepare(self, step: int, pull: Pull) -> Prepared:
        return self._attack(step, list(enumerate(pull())), last=True)

    def attack_micro(self, step: int, micro: int, batch: B.Batch, last: bool) -> Optional[Tensor]:
        return self._attack(step, [(micro, batch)], last)[0][1]

    def _attack(self, step: int, batches: list[tuple[int, B.Batch]], last: bool) -> Prepared:
        """δ for the (micro index, batch) pairs of step `step`, from w_{max(step-τ, 0)}; the live
        weights w_step are kept (once per step) for the steps to come; versions no longer needed
        are dropped once the step's last micro-batch is attacked."""
        source_step = max(step - self.tau, 0)
        if source_step == step:
            prepared = [(b, self.attack(b, step, i)) for i, b in batches]
        else:
            if source_step not in self.history:
                raise RuntimeError(f"conadv snapshot of step {source_step} missing at step {step}: "
                                   "steps must be taken in order")
            with self.stale.swapped(self.history[source_step]):
                prepared = [(b, self.attack(b, step, i)) for i, b in batches]
        keep_from = max(step + 1 - self.tau, 0) if last else max(step - self.tau, 0)
        for s in [s for s in self.history if s < keep_from]:
            del self.history[s]
        if step not in self.history:
            self.history[step] = self.stale.capture()
        return prepared

    def extra_bytes(self) -> int:
        return tensor_bytes(list(self.history.values()))

    def state_dict(self) -> dict:
        return {"history": dict(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if any(not isinstance(snap, dict) for snap in state["history"].values()):
            raise ConfigError("checkpoint: its conadv snapshots hold weights without BatchNorm running statistics "
                              "(saved by an earlier conadv_ds); resume it with that version or start a new output "
                              "folder")
        self.history = collections.OrderedDict(sorted(state["history"].items()))


def build_schedule(cfg: ConAdvConfig, space: Optional[Space], engine: Any, module: nn.Module,
                   loss_fn: B.LossFn = B.default_loss, rank: int = 0,
                   autocast: Callable[[], ContextManager] = nullcontext, whole_steps: bool = True) -> Schedule:
    """The schedule a `conadv` block asks for, for every front end.

    `engine` holds the weights (a DeepSpeedEngine, a DDP wrapper or the module itself: old
    weights are kept as its shards), `module` is the model the attack runs, `rank` seeds the
    attack's stream. `whole_steps=False` is for loops that hand over one micro-batch at a time:
    τ ≥ 1 then always uses snapshots (a lookahead needs the next step's batches)."""
    if not cfg.adversarial:
        return Clean()
    mechanism = cfg.stale_mechanism(whole_steps)
    if mechanism == "split":
        from .split.trainer import Remote

        return Remote(engine, space, cfg.staleness)
    adversary = Adversary(module, space, cfg, loss_fn, rank=rank, autocast=autocast)
    if mechanism is None:
        return DisAdv(adversary)
    if mechanism == "lookahead":
        return Lookahead(adversary)
    return Snapshot(adversary, cfg.staleness, stale_weights_for(engine))
