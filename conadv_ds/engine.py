"""ConAdvEngine: a DeepSpeedEngine whose training batches carry adversarial copies.

The wrapper owns one thing, `train_batch`: one optimizer step over the engine's
gradient-accumulation micro-batches, each trained on (1-λ)·L(x) + λ·L(x+δ) with a single
`engine.backward`. δ comes from the schedule (`schedule.py`); the attack only takes input
gradients, so DeepSpeed's gradients, partitions, loss scale and accumulation boundaries are
those of a plain step on the same loss. Everything else is DeepSpeed's, reached through the
wrapper (`engine.module`, `engine.save_checkpoint`, `engine.global_steps`, ...).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor

from . import batch as B
from . import checkpoint as ckpt
from .adversary import Adversary
from .bn import adversarial_branch
from .config import ConAdvConfig
from .perturb import EmbeddingSpace, PixelSpace, make_space
from .schedule import build_schedule
from .stale import stale_weights_for


class ConAdvEngine:
    """Wraps a `deepspeed.DeepSpeedEngine`; attributes it does not define are the wrapped engine's."""

    is_attacker = False
    """True only on the attacker ranks of schedule 'split' (`split.SplitAttacker`)."""

    def __init__(self, engine, conadv: ConAdvConfig, loss_fn: Optional[B.LossFn] = None,
                 perturb: Optional[Union[PixelSpace, EmbeddingSpace]] = None):
        self.ds = engine
        self.conadv = conadv
        self.loss_fn = loss_fn or B.default_loss
        self.space = (perturb or make_space(conadv.space)).bind(engine.module) if conadv.adversarial else None
        self._float_dtype = _compute_dtype(engine)
        self._iter: Optional[Iterator] = None
        self.schedule = self._make_schedule()
        self.micro_batches_pulled = 0
        """Micro-batches drawn from data iterators so far (lookahead draws one step ahead); a
        resumed run skips this many to continue the data stream where it stopped."""
        self._nonfinite = 0

    def _make_schedule(self):
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        if self.conadv.adversarial and self.conadv.schedule == "split":
            from .split import Remote

            return Remote(self.ds, self.space, self.conadv.staleness)
        adversary = Adversary(self.ds.module, self.space, self.conadv, self.loss_fn, rank=self.ds.global_rank,
                              autocast=lambda: autocast_if_enabled(self.ds)) if self.conadv.adversarial else None
        return build_schedule(self.conadv, adversary, lambda: stale_weights_for(self.ds))

    # -- forwarding -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    # -- training ---------------------------------------------------------------------------
    def _pull(self, data_iter: Iterator) -> list[B.Batch]:
        out = []
        for _ in range(self.ds.gradient_accumulation_steps()):
            b = next(data_iter)
            self.micro_batches_pulled += 1
            B.check(b)
            out.append(B.to_device(b, self.ds.device, self._float_dtype))
        return out

    def _default_iter(self) -> Iterator:
        if self._iter is None:
            loader = self.ds.training_dataloader
            if loader is None:
                raise ValueError("train_batch() needs a data_iter when initialize() got no training_data")
            from deepspeed.utils import RepeatingLoader

            self._iter = iter(RepeatingLoader(loader))
        return self._iter

    def train_batch(self, data_iter: Optional[Iterator] = None) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches from `data_iter`.

        Returns rank-averaged metrics: loss, clean_loss and adv_loss (when adversarial),
        accuracy and adv_accuracy (when the batches carry labels), lr, samples_per_sec.
        """
        data_iter = data_iter if data_iter is not None else self._default_iter()
        start = time.perf_counter()
        step = self.ds.global_steps
        prepared = self.schedule.prepare(step, lambda: self._pull(data_iter), data_iter)
        lam = self.conadv.adv_weight
        sums = torch.zeros(7, dtype=torch.float64)
        for i, (batch, delta) in enumerate(prepared):
            loss = torch.zeros((), device=self.ds.device)
            if delta is None or lam < 1:
                out = B.call(self.ds, batch)
                clean = self.loss_fn(out, batch)
                loss = clean if delta is None else (1 - lam) * clean
                sums[1] += float(clean.detach())
                sums[3:5] += torch.tensor(B.correct(out, batch), dtype=torch.float64)
                del out
            if delta is not None:
                part = self.space.adversarial_part(batch)
                with adversarial_branch(self.ds.module, self.conadv.aux_bn):
                    out = self.space.forward(self.ds, part, delta)
                adv = self.loss_fn(out, part)
                loss = loss + lam * adv
                sums[2] += float(adv.detach())
                sums[5:7] += torch.tensor(B.correct(out, part), dtype=torch.float64)
                del out
            sums[0] += float(loss.detach())
            self.ds.backward(loss)
            if i == len(prepared) - 1:
                self.schedule.before_update()
            self.ds.step()
        metrics = self._metrics(sums, len(prepared), any(d is not None for _, d in prepared), start)
        self._check_finite(metrics["loss"])
        return metrics

    def stop_attackers(self) -> None:
        """Schedule 'split': the attacker ranks' `train_batch` raises StopIteration from now on,
        so the same loop ends on every rank. Call it on every trainer when training ends early
        (the end of the data does it anyway); a no-op for the other schedules."""
        self.schedule.stop(self.ds.global_steps)

    def _check_finite(self, loss: float) -> None:
        limit = self.conadv.max_nonfinite_steps
        if self.ds.fp16_enabled() or limit == 0:
            return
        self._nonfinite = 0 if math.isfinite(loss) else self._nonfinite + 1
        if self._nonfinite >= limit:
            raise FloatingPointError(f"loss is {loss} for {self._nonfinite} consecutive steps (up to step "
                                     f"{self.ds.global_steps}); stopping (conadv.max_nonfinite_steps={limit}). "
                                     "Lower the learning rate or check the data.")

    def _metrics(self, sums: Tensor, n_micro: int, adversarial: bool, start: float) -> dict[str, float]:
        from deepspeed import comm as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            sums[:3] /= dist.get_world_size()
        m = {"step": float(self.ds.global_steps), "loss": float(sums[0]) / n_micro}
        if not adversarial or self.conadv.adv_weight < 1:
            m["clean_loss"] = float(sums[1]) / n_micro
        if adversarial:
            m["adv_loss"] = float(sums[2]) / n_micro
        if sums[4] > 0:
            m["accuracy"] = float(sums[3] / sums[4])
        if sums[6] > 0:
            m["adv_accuracy"] = float(sums[5] / sums[6])
        lrs = self.ds.get_lr()
        m["lr"] = float(lrs[0]) if lrs else 0.0
        m["samples_per_sec"] = self.ds.train_batch_size() / max(time.perf_counter() - start, 1e-9)
        return m

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.ds.global_steps, "micro_batches_pulled": self.micro_batches_pulled,
                "schedule": self.schedule.state_dict(), "rng": ckpt.rng_state(), "nonfinite": self._nonfinite,
                "conadv": self.conadv.model_dump()}

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, **kwargs: Any) -> bool:
        """DeepSpeed's checkpoint plus this rank's ConAdv state (pending lookahead batches and δ
        or old-weight shards, RNG streams, data position, effective config), written crash-safe:
        to `<tag>.partial`, moved into place when all ranks are done, then `latest` updated."""
        from deepspeed import comm as dist

        tag = str(tag if tag is not None else f"global_step{self.ds.global_steps}")
        client = {**(client_state or {}), "conadv": self.conadv.model_dump()}
        ok = self.ds.save_checkpoint(save_dir, tag=tag + ckpt.PARTIAL, client_state=client, save_latest=False,
                                     **kwargs)
        ckpt.atomic_save(self._state(), Path(save_dir) / (tag + ckpt.PARTIAL) / f"conadv_rank{self.ds.global_rank}.pt")
        dist.barrier()
        if self.ds.global_rank == 0:
            ckpt.publish(Path(save_dir), tag, update_latest=save_latest)
        dist.barrier()
        return ok

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> tuple[Optional[str], dict]:
        """DeepSpeed's `load_checkpoint` (default: the `latest` tag), then the ConAdv state."""
        tag = str(tag) if tag is not None else ckpt.read_latest(Path(load_dir))
        if tag is None:
            raise FileNotFoundError(f"checkpoint folder {str(load_dir)!r}: no '{ckpt.LATEST}' file; nothing to resume")
        path, client = self.ds.load_checkpoint(load_dir, tag=tag, **kwargs)
        if path is None:
            raise FileNotFoundError(f"checkpoint {str(Path(load_dir) / tag)!r}: could not be loaded")
        state_file = Path(load_dir) / tag / f"conadv_rank{self.ds.global_rank}.pt"
        if state_file.is_file():
            state = torch.load(state_file, map_location="cpu", weights_only=False)
            self.schedule.load_state_dict(B.to_device(state["schedule"], self.ds.device))
            self.micro_batches_pulled = state["micro_batches_pulled"]
            self._nonfinite = state["nonfinite"]
            ckpt.set_rng_state(state["rng"])
        return path, client or {}

    def stale_bytes(self) -> int:
        """Bytes this rank holds for old weights (0 for lookahead and DisAdv)."""
        return self.schedule.extra_bytes()


def _compute_dtype(engine) -> Optional[torch.dtype]:
    """Floating inputs are cast to this (the model's dtype under fp16/bf16), else left alone."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return None
