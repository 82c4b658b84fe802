"""The attacker side of schedule 'split': holds the stale weights and serves δ; no DeepSpeed engine."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .. import batch as B
from ..adversary import Adversary
from ..config import ConAdvConfig
from ..errors import ConfigError
from ..perturb import Space
from . import wire
from .link import current_link
from .shares import AssembledWeights


class SplitAttacker:
    """What `conadv_ds.initialize` returns on an attacker rank: holds the stale weights and serves
    one trainer step per `train_batch` call; it never builds a DeepSpeed engine."""

    is_attacker = True

    def __init__(self, model: nn.Module, space: Space, cfg: ConAdvConfig,
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
        self.outbox = wire.Outbox(self.link.side)
        self.link.begin(self)
        self.weights = AssembledWeights(self.module, [wire.recv_object(self.link.side, t, wire.TAG_LAYOUT)
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
        headers = {t: torch.zeros(wire.HEADER_LEN, dtype=torch.int64) for t in layout.trainers}
        for w in [side.recv([h], t, wire.TAG_HEADER) for t, h in headers.items()]:
            w.wait()
        heads = {t: wire.decode_header(h) for t, h in headers.items()}
        kinds, steps = {h.kind for h in heads.values()}, {h.step for h in heads.values()}
        if len(kinds) != 1 or len(steps) != 1:
            raise RuntimeError(f"conadv split: trainers out of step: {heads}")
        step = steps.pop()
        if kinds.pop() == wire.STOP:
            raise StopIteration
        payloads = {t: torch.empty(heads[t].payload_len, dtype=torch.uint8) for t in self.trainers
                    if heads[t].payload_len > 0}
        works = [side.recv([piece], t, wire.TAG_WEIGHTS) for k, t in enumerate(layout.trainers)
                 for piece in self.weights.targets(k)]
        works += [side.recv([buf], t, wire.TAG_PAYLOAD) for t, buf in payloads.items()]
        for w in works:
            w.wait()
        self.weights.unpack()
        jobs = {t: wire.decode_job(buf) for t, buf in payloads.items()}
        attack_start = time.perf_counter()
        for t, job in jobs.items():
            self._attack(t, job)
        self.outbox.wait()
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
                # to the host for gloo: the attacker rank's one device-to-host copy per micro-batch
                delta = self.adversaries[trainer](batch, s, micro).detach().cpu().contiguous()
                if trainer not in self._described:
                    trailing = delta.shape[self.space.delta_shape_key(self.space.adversarial_part(batch)).dim():]
                    self.outbox.send(wire.encode_spec(tuple(trailing), delta.dtype), trainer, wire.TAG_SPEC)
                    self._described.add(trainer)
                self.outbox.send(delta, trainer, wire.TAG_DELTA)

    def close(self) -> None:
        self.outbox.wait()

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
