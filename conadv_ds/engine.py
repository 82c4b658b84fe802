"""ConAdvEngine: a DeepSpeedEngine whose training batches carry adversarial copies.

The wrapper owns one thing, `train_batch`: one optimizer step over the engine's
gradient-accumulation micro-batches, each trained on the one objective (`objective.py`) with
a single `engine.backward`. δ comes from the schedule (`schedule.py`) that `initialize` built;
the attack only takes input gradients, so DeepSpeed's gradients, partitions, loss scale and
accumulation boundaries are those of a plain step on the same loss. Everything else is
DeepSpeed's, reached through the wrapper (`engine.module`, `engine.save_checkpoint`,
`engine.global_steps`, ...).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from . import batch as B
from . import checkpoint as ckpt
from .config import ConAdvConfig
from .objective import Objective, StepMetrics
from .perturb import Space
from .schedule import Pull, Schedule


class ConAdvEngine:
    """Wraps a `deepspeed.DeepSpeedEngine`; attributes it does not define are the wrapped engine's."""

    is_attacker = False
    """True only on the attacker ranks of schedule 'split' (`split.attacker.SplitAttacker`)."""

    def __init__(self, engine, conadv: ConAdvConfig, schedule: Schedule, space: Optional[Space],
                 loss_fn: Optional[B.LossFn] = None):
        self.ds = engine
        self.conadv = conadv
        self.loss_fn = loss_fn or B.default_loss
        self.space = space
        self.schedule = schedule
        self.objective = Objective(space, conadv.adv_weight, engine.module, conadv.aux_bn)
        self._float_dtype = _compute_dtype(engine)
        self._iter: Optional[Iterator] = None
        self.micro_batches_pulled = 0
        """Micro-batches drawn from data iterators so far (lookahead draws one step ahead); a
        resumed run skips this many to continue the data stream where it stopped."""
        self._nonfinite = 0

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

    def _forward(self, batch: B.Batch) -> tuple[torch.Tensor, Any]:
        out = B.call(self.ds, batch)
        return self.loss_fn(out, batch), out

    def train_batch(self, data_iter: Optional[Iterator] = None) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches from `data_iter`.

        Returns rank-averaged metrics: loss, clean_loss and adv_loss (when adversarial),
        accuracy and adv_accuracy (when the batches carry labels), lr, samples_per_sec; they
        are read from the device once per step.
        """
        data_iter = data_iter if data_iter is not None else self._default_iter()
        start = time.perf_counter()
        prepared = self.schedule.prepare(self.ds.global_steps, Pull(lambda: self._pull(data_iter), data_iter))
        stats = StepMetrics()
        for batch, delta in prepared:
            micro = self.objective(self._forward, batch, delta)
            stats.add(micro.stats)
            self.ds.backward(micro.loss)
            self.ds.step()
        lrs = self.ds.get_lr()
        metrics = {"step": float(self.ds.global_steps), **stats.read(), "lr": float(lrs[0]) if lrs else 0.0,
                   "samples_per_sec": self.ds.train_batch_size() / max(time.perf_counter() - start, 1e-9)}
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

    # -- checkpoints --------------------------------------------------------------------------
    def _state_identity(self) -> dict:
        return ckpt.run_identity(self.conadv.model_dump(), self.ds.world_size)

    def _state(self) -> dict:
        return {"step": self.ds.global_steps, "micro_batches_pulled": self.micro_batches_pulled,
                "schedule": self.schedule.state_dict(), "rng": ckpt.rng_state(), "nonfinite": self._nonfinite,
                **self._state_identity()}

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: Optional[dict] = None,
                        save_latest: bool = True, save_total_limit: Optional[int] = None, **kwargs: Any) -> bool:
        """DeepSpeed's checkpoint plus this rank's ConAdv state (pending lookahead batches and δ
        or old-weight shards, RNG streams, data position, effective config), written crash-safe
        (`checkpoint.py`): to `<tag>.partial`, moved into place when all ranks are done, then
        `latest` updated. `save_total_limit` keeps only that many of the newest checkpoints in
        `save_dir` (as the Trainer's); the one `latest` names is never deleted."""
        from deepspeed import comm as dist

        tag = str(tag if tag is not None else f"global_step{self.ds.global_steps}")
        client = {**(client_state or {}), "conadv": self.conadv.model_dump()}
        results = []

        def write(partial: Path) -> None:
            results.append(self.ds.save_checkpoint(save_dir, tag=partial.name, client_state=client, save_latest=False,
                                                   **kwargs))
            ckpt.atomic_save(self._state(), partial / f"conadv_rank{self.ds.global_rank}.pt")

        ckpt.save_folder(Path(save_dir), tag, self.ds.global_rank == 0, dist.barrier, write, self._state_identity(),
                         update_latest=save_latest, keep=save_total_limit)
        return results[0]

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> tuple[Optional[str], dict]:
        """DeepSpeed's `load_checkpoint` (default: the `latest` tag), then the ConAdv state. A
        checkpoint of another schedule, staleness, stale-weight mechanism or world size is a
        one-line error: its per-rank state continues only the run that wrote it."""
        from deepspeed import comm as dist

        tag = ckpt.open_folder(Path(load_dir), None if tag is None else str(tag), self.ds.global_rank == 0,
                               dist.barrier, self._state_identity())
        if tag is None:
            raise FileNotFoundError(f"checkpoint folder {str(load_dir)!r}: no '{ckpt.LATEST}' file; nothing to resume")
        ckpt.check_files(Path(load_dir) / tag)  # before anything is loaded: no file needs a class we would not build
        ckpt.use_safe_loading(self.ds)
        state_file = Path(load_dir) / tag / f"conadv_rank{self.ds.global_rank}.pt"
        state = ckpt.load_state(state_file) if state_file.is_file() else None
        if state is not None:
            ckpt.check_same_run(state, self._state_identity(), str(Path(load_dir) / tag))
        path, client = self.ds.load_checkpoint(load_dir, tag=tag, **kwargs)
        if path is None:
            raise FileNotFoundError(f"checkpoint {str(Path(load_dir) / tag)!r}: could not be loaded")
        if state is not None:
            self.schedule.load_state_dict(B.to_device(state["schedule"], self.ds.device))
            self.micro_batches_pulled = state["micro_batches_pulled"]
            self._nonfinite = state["nonfinite"]
            ckpt.set_rng_state(state["rng"])
        return path, client or {}

    def stale_bytes(self) -> int:
        """Bytes this rank holds for the schedule beyond a plain DeepSpeed step: old-weight shards
        (snapshots), and the next step's micro-batches with their δ (lookahead, split); 0 for
        DisAdv."""
        return self.schedule.extra_bytes()


def _compute_dtype(engine) -> Optional[torch.dtype]:
    """Floating inputs are cast to this (the model's dtype under fp16/bf16), else left alone."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return None
