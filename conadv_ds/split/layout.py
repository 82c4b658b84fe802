"""Which launch ranks attack and which train (pure: no process group is touched)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..config import ConAdvConfig
from ..errors import ConfigError


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


def plan_layout(cfg: ConAdvConfig, ds: dict, launch_size: int) -> Optional[Layout]:
    """The layout a resolved `conadv` block asks for on `launch_size` ranks (attackers included),
    checked before any process group exists: None unless the schedule is 'split'. `ds` is the
    DeepSpeed dict; its ZeRO-3 group sizes are checked against the trainer count, which is
    DeepSpeed's world size (so is its batch arithmetic, in `resolve.resolve_config`)."""
    if not (cfg.adversarial and cfg.schedule == "split"):
        return None
    layout = _layout(cfg.attacker_ranks, launch_size)
    n, size = len(layout.trainers), layout.launch_size
    zero = ds.get("zero_optimization")
    hpz = zero.get("zero_hpz_partition_size", 1) if isinstance(zero, dict) and zero.get("stage") == 3 else 1
    if isinstance(hpz, int) and 1 < hpz < n and n % hpz:
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size={hpz}: must divide the {n} trainer ranks "
                          f"(schedule 'split' with {len(layout.attackers)} attacker ranks of {size})")
    return layout
