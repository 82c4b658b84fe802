"""When each batch is attacked, and with which weights.

A schedule turns "give me the micro-batches of step t" into `[(batch, δ or None), ...]`:

- `Clean`: no attack.
- `DisAdv`: δ_t from the current weights w_t, computed before the update.
- `Lookahead` (ConAdv, τ = 1): while step t runs, the next step's batches are pulled and
  attacked with w_t, which is in place anyway, so no weights are ever copied.
- `Snapshot` (ConAdv, any τ): δ_t from w_{max(t-τ, 0)}, each rank keeping its own shard of
  the last τ weight versions (see `stale.py`).
"""

from __future__ import annotations

import collections
import warnings
from typing import Callable, Optional

from torch import Tensor

from .batch import Batch
from .config import ConAdvConfig
from .errors import ConfigError
from .stale import snapshot_bytes

Attack = Callable[[Batch, int, int], Tensor]
"""attack(batch, step, micro) -> δ, with whatever weights are in the model."""
Pull = Callable[[], list[Batch]]
"""Returns the next step's micro-batches; raises StopIteration when the data ends."""
Prepared = list[tuple[Batch, Optional[Tensor]]]


class Clean:
    def prepare(self, step: int, pull: Pull, source: object) -> Prepared:
        return [(b, None) for b in pull()]

    def extra_bytes(self) -> int:
        return 0

    def before_update(self) -> None:
        """Called before the optimizer step changes the weights."""

    def stop(self, step: int) -> None:
        """Training ends at `step`: release whatever serves the schedule (attacker ranks)."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold to continue the schedule exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DisAdv(Clean):
    def __init__(self, attack: Attack):
        self.attack = attack

    def prepare(self, step: int, pull: Pull, source: object) -> Prepared:
        return [(b, self.attack(b, step, i)) for i, b in enumerate(pull())]


class Lookahead(DisAdv):
    """τ = 1 without a weight copy. The pending batches belong to the iterator they came from:
    a different iterator starts afresh (that one step is then attacked with w_t)."""

    def __init__(self, attack: Attack):
        super().__init__(attack)
        self.pending: Optional[tuple[int, object, Prepared]] = None
        self._warned = False

    def state_dict(self) -> dict:
        return {"pending": None if self.pending is None else (self.pending[0], self.pending[2])}

    def load_state_dict(self, state: dict) -> None:
        """Restored batches are taken by whichever iterator comes next (source None)."""
        pending = state["pending"]
        self.pending = None if pending is None else (pending[0], None, pending[1])

    def prepare(self, step: int, pull: Pull, source: object) -> Prepared:
        if self.pending is not None and self.pending[0] == step and (self.pending[1] is None or self.pending[1] is source):
            current = self.pending[2]
        else:
            if self.pending is not None and step > 0 and not self._warned:
                warnings.warn("conadv lookahead: a new data iterator; its first step is attacked with the "
                              "current weights. Keep one iterator across epochs for exact staleness.")
                self._warned = True
            current = super().prepare(step, pull, source)
        self.pending = None
        try:
            upcoming = pull()
        except StopIteration:
            return current
        self.pending = (step + 1, source, [(b, self.attack(b, step + 1, i)) for i, b in enumerate(upcoming)])
        return current


class Snapshot(DisAdv):
    """δ_t from w_{max(t-τ, 0)}; keeps at most τ shard snapshots."""

    def __init__(self, attack: Attack, staleness: int, stale):
        super().__init__(attack)
        self.tau, self.stale = staleness, stale
        self.history: collections.OrderedDict[int, list[Tensor]] = collections.OrderedDict()  # step -> shards

    def prepare(self, step: int, pull: Pull, source: object) -> Prepared:
        return self.attack_step(step, pull())

    def attack_step(self, step: int, batches: list[Batch], first_micro: int = 0, last: bool = True) -> Prepared:
        """δ for micro-batches `first_micro, first_micro+1, ...` of step `step`, from w_{max(step-τ, 0)};
        the live weights w_step are kept (once per step) for the steps to come. Loops that see
        one micro-batch at a time (e.g. the Hugging Face Trainer) call it once per micro-batch,
        with `last` on the step's final one: only then are versions no longer needed dropped."""
        source_step = max(step - self.tau, 0)
        if source_step == step:
            prepared = [(b, self.attack(b, step, first_micro + i)) for i, b in enumerate(batches)]
        else:
            if source_step not in self.history:
                raise RuntimeError(f"conadv snapshot of step {source_step} missing at step {step}: "
                                   "steps must be taken in order")
            with self.stale.swapped(self.history[source_step]):
                prepared = [(b, self.attack(b, step, first_micro + i)) for i, b in enumerate(batches)]
        keep_from = max(step + 1 - self.tau, 0) if last else max(step - self.tau, 0)
        for s in [s for s in self.history if s < keep_from]:
            del self.history[s]
        if step not in self.history:
            self.history[step] = self.stale.capture()
        return prepared

    def extra_bytes(self) -> int:
        return sum(snapshot_bytes(s) for s in self.history.values())

    def state_dict(self) -> dict:
        return {"history": dict(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = collections.OrderedDict(sorted(state["history"].items()))


def build_schedule(cfg: ConAdvConfig, attack: Attack, stale: Callable[[], object]):
    """The schedule a `conadv` block asks for; `stale()` makes the old-weight store when one is needed."""
    if not cfg.adversarial:
        return Clean()
    if cfg.schedule == "split":
        raise ConfigError("conadv.schedule='split': attacker ranks are not available in this version; "
                          "allowed: clean, disadv, conadv")
    if cfg.schedule == "disadv":
        return DisAdv(attack)
    if cfg.uses_lookahead:
        return Lookahead(attack)
    return Snapshot(attack, cfg.staleness, stale())
