"""Counting the calls that make the host wait for the device, in any training loop.

On a GPU each of them is a stall: the host stops queueing work until the device has caught up.
`SyncCounter` wraps them while active: device synchronisations (DeepSpeed's
`get_accelerator().synchronize`, `torch.cuda.synchronize`, `torch.accelerator.synchronize`,
stream and event `synchronize`) and reads or copies of a tensor on the device to the host
(`READS`, `.to("cpu")`). On the CPU nothing waits, but the same calls are made, so a count taken
there is the count a GPU run would pay — except `.to`, where a move to the engine's device and a
copy to the host are the same call: on the CPU only a copy written as `.to("cpu")` is counted
(DeepSpeed's moves to `get_accelerator().current_device_name()`, the string "cpu" there, are
counted too: compare counts with and without ConAdv, not absolute ones). Not counted: a
device-to-host `copy_` into an existing host tensor, and reads made on other threads.
"""

from __future__ import annotations

import collections
import sys
import traceback
from typing import Any, Callable, Optional, Union

import torch

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")
"""Tensor methods that bring values to the host."""


class SyncCounter:
    """`with SyncCounter(device) as c: ...`: `c.count` calls in the block (a call made inside
    another counted call is not counted again: DeepSpeed's synchronize calls torch's), split by
    callable in `c.calls`; `c.device_syncs` of them synchronisations. Calls made (at any depth)
    from a file whose path contains one of `outside` are not counted (e.g. a library's own reads
    inside a model's forward)."""

    def __init__(self, device: Union[str, torch.device] = "cpu", outside: tuple[str, ...] = ()):
        self.device_type = torch.device(device).type
        self.outside = outside
        self.calls: collections.Counter[str] = collections.Counter()
        self._depth = 0
        self._restore: list[Callable[[], None]] = []

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    @property
    def device_syncs(self) -> int:
        return sum(n for name, n in self.calls.items() if name.endswith(".synchronize"))

    def _on_device(self, args: tuple, kwargs: dict) -> bool:
        return args[0].device.type == self.device_type

    def _to_host(self, args: tuple, kwargs: dict) -> bool:
        if self.device_type == "cpu":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            return isinstance(target, str) and torch.device(target).type == "cpu"
        return self._on_device(args, kwargs) and _to_target(args[1:], kwargs) == "cpu"

    def _wrapped(self) -> list[tuple[Any, str, Callable[[tuple, dict], bool]]]:
        """(owner, attribute, whether a call counts) of every callable to wrap."""
        def always(args: tuple, kwargs: dict) -> bool:
            return True

        targets = [(torch.Tensor, name, self._on_device) for name in READS] + [(torch.Tensor, "to", self._to_host)]
        targets += [(owner, "synchronize", always) for owner in (torch.cuda, torch.cuda.Stream, torch.cuda.Event,
                                                                 getattr(torch, "accelerator", None))
                    if hasattr(owner, "synchronize")]
        accelerator = sys.modules.get("deepspeed.accelerator")
        if accelerator is not None:
            targets.append((type(accelerator.get_accelerator()), "synchronize", always))
        return targets

    def _counted_here(self) -> bool:
        return not self.outside or not any(part in frame.filename for frame in traceback.extract_stack()
                                           for part in self.outside)

    def _wrap(self, label: str, fn: Callable, counts: Callable[[tuple, dict], bool]) -> Callable:
        def call(*args, **kwargs):
            if self._depth == 0 and counts(args, kwargs) and self._counted_here():
                self.calls[label] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return call

    def __enter__(self) -> "SyncCounter":
        for owner, name, counts in self._wrapped():
            own = name in vars(owner)
            original = vars(owner)[name] if own else getattr(owner, name)
            label = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
            setattr(owner, name, self._wrap(label, getattr(owner, name), counts))
            self._restore.append((lambda o=owner, n=name, f=original: setattr(o, n, f)) if own
                                 else (lambda o=owner, n=name: delattr(o, n)))
        return self

    def __exit__(self, *exc) -> None:
        while self._restore:
            self._restore.pop()()


def _to_target(args: tuple, kwargs: dict) -> Optional[str]:
    """The device type a `Tensor.to(*args, **kwargs)` call moves to; None when it keeps the device."""
    target = kwargs.get("device")
    for a in args:
        if isinstance(a, torch.Tensor):
            target = a.device
        elif isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool)):
            target = a
    return None if target is None else torch.device(target).type
