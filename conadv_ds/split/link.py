"""The process groups of a split launch; the only module that holds process-group state.

`connect` builds, from the launcher's TCPStore, a gloo side group over every launch rank (δ,
batches and weights travel there) and gives the trainers a world of their own, which becomes
their default group, so that DeepSpeed (whose ZeRO-3 set-up has world barriers) and the
engine's metrics and checkpoints never see an attacker. On trainers `RANK` and `WORLD_SIZE`
are rewritten to the trainer world.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError
from .layout import Layout


@dataclass
class Link:
    """This process's place in a split launch: its launch rank and the side group over all ranks."""

    layout: Layout
    rank: int
    side: Any
    session: Optional[Any] = field(default=None, repr=False)

    @property
    def is_attacker(self) -> bool:
        return self.rank in self.layout.attackers

    def begin(self, session: Any) -> None:
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


def launch_size() -> int:
    """The number of ranks this launch started, attackers included, known before `connect`."""
    if _LINK is not None:
        return _LINK.layout.launch_size
    import torch.distributed as dist

    if dist.is_initialized():
        raise ConfigError("conadv.schedule='split': torch.distributed is already initialized; let "
                          "conadv_ds.initialize create the process groups (the trainer ranks get a world of their own)")
    return int(os.environ.get("WORLD_SIZE", "1"))
