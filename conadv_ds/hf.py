"""ConAdv for the Hugging Face Trainer: one import away.

    from conadv_ds.hf import ConAdvTrainer, ConAdvTrainingArguments

    args = ConAdvTrainingArguments("out", conadv={"space": "embedding", "norm": "l2", "epsilon": 1.0},
                                   deepspeed="ds_config.json")       # or a "conadv" block in that JSON
    ConAdvTrainer(model=model, args=args, train_dataset=ds).train()

Each training micro-batch is trained on (1-λ)·L(x) + λ·L(x+δ) with the Trainer's single backward.
The Trainer hands out one micro-batch at a time, so old weights come from sharded snapshots
(`schedule.Snapshot`): δ_t is computed from w_{t-τ}. The perturbation lives on the word-embedding
output for models with `input_ids` and `get_input_embeddings()`, on `pixel_values` otherwise.
`clean_loss` and `adv_loss` appear in the Trainer's logs; the ConAdv state is saved with every
checkpoint and restored by `resume_from_checkpoint`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import Trainer, TrainingArguments

from . import batch as B
from . import checkpoint as ckpt
from .adversary import Adversary
from .config import CONADV_KEY, ConAdvConfig, load_json, parse_conadv
from .errors import ConfigError
from .perturb import EmbeddingSpace, PixelSpace
from .schedule import DisAdv, Snapshot
from .stale import stale_weights_for


def merge_conadv(explicit: Union[dict, str, None], deepspeed: Union[dict, str, None]) -> ConAdvConfig:
    """The `conadv` argument (a block, or a JSON / dict holding one) over the `conadv` block of the
    DeepSpeed config; a key set differently in both places is an error."""
    def block_of(source) -> dict:
        if source is None:
            return {}
        data = load_json(source)
        return dict(data[CONADV_KEY]) if CONADV_KEY in data else data

    mine, theirs = block_of(explicit), load_json(deepspeed).get(CONADV_KEY, {}) if deepspeed is not None else {}
    for key in mine.keys() & theirs.keys():
        if mine[key] != theirs[key]:
            raise ConfigError(f"conadv.{key}: {mine[key]!r} in the conadv argument but {theirs[key]!r} in the "
                              "DeepSpeed config's conadv block; set it in one place")
    if not mine and not theirs:
        return parse_conadv(None)
    return parse_conadv({**theirs, **mine})


@dataclass
class ConAdvTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus `conadv` (a dict or a JSON path; the `conadv` block of the
    DeepSpeed config named by `deepspeed` is used too)."""

    conadv: Optional[Union[dict, str]] = field(default=None, metadata={"help": "the conadv block, or a JSON path"})

    def __post_init__(self):
        self.conadv_config = merge_conadv(self.conadv, self.deepspeed if isinstance(self.deepspeed, (str, dict))
                                          else None)
        if self.conadv_config.adversarial and self.conadv_config.schedule == "split":
            raise ConfigError("conadv.schedule='split': the Trainer runs 'disadv' and 'conadv'; attacker ranks "
                              "are available through conadv_ds.initialize")
        if isinstance(self.deepspeed, (str, Path, dict)):
            ds = load_json(self.deepspeed)
            ds.pop(CONADV_KEY, None)
            self.deepspeed = ds
            _gloo_state_for_deepspeed_on_cpu(self)
        super().__post_init__()


def _gloo_state_for_deepspeed_on_cpu(args: TrainingArguments) -> None:
    """On CPU under torchrun the Trainer's DeepSpeed path would see a world of one: create the
    distributed state with gloo first and have the Trainer use it."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    cfg = args.accelerator_config
    if cfg is None or isinstance(cfg, dict):
        args.accelerator_config = {**(cfg or {}), "use_configured_state": True}


class ConAdvTrainer(Trainer):
    """A `Trainer` whose training loss includes adversarial copies of each micro-batch."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conadv: ConAdvConfig = getattr(self.args, "conadv_config", None) or parse_conadv(None)
        self.loss_is_scaled_for_ga = False
        self._schedule = None
        self._micro = (-1, 0)  # (step, index of the next micro-batch within it)
        self._sums = torch.zeros(3, dtype=torch.float64)  # clean, adv, count since the last log

    # -- the attack ----------------------------------------------------------------------------
    def _space(self, module, inputs):
        if self.conadv.space == "embedding" or ("input_ids" in inputs and "pixel_values" not in inputs):
            return EmbeddingSpace().bind(module)
        return PixelSpace(input_key="pixel_values")

    def _schedule_for(self, inputs):
        if self._schedule is None:
            module = self.accelerator.unwrap_model(self.model)
            cfg = self.conadv
            if "input_ids" not in inputs and cfg.space == "embedding":
                raise ConfigError("conadv.space='embedding': the batches have no input_ids; use 'pixel'")
            self._space_obj = self._space(module, inputs)
            adversary = Adversary(module, self._space_obj, cfg, B.default_loss, rank=self.args.process_index,
                                  autocast=self.autocast_smart_context_manager)
            if cfg.schedule == "disadv":
                self._schedule = DisAdv(adversary)
            elif cfg.schedule == "conadv":
                engine = self.model_wrapped if self.is_deepspeed_enabled else module
                self._schedule = Snapshot(adversary, cfg.staleness, stale_weights_for(engine))
            else:
                raise ConfigError(f"conadv.schedule={cfg.schedule!r}: the Trainer supports 'disadv' and 'conadv'")
        return self._schedule

    def _delta(self, inputs) -> torch.Tensor:
        step = self.state.global_step
        micro = self._micro[1] if self._micro[0] == step else 0
        self._micro = (step, micro + 1)
        schedule = self._schedule_for(inputs)
        if isinstance(schedule, Snapshot):
            last = micro + 1 >= self.args.gradient_accumulation_steps
            return schedule.attack_step(step, [inputs], first_micro=micro, last=last)[0][1]
        return schedule.attack(inputs, step, micro)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not (self.conadv.adversarial and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        delta = self._delta(inputs)
        outputs = model(**inputs)
        part = self._space_obj.adversarial_part(inputs)
        adv = self._space_obj.forward(model, part, delta).loss
        lam = self.conadv.adv_weight
        loss = (1 - lam) * outputs.loss + lam * adv
        self._sums += torch.tensor([float(outputs.loss.detach()), float(adv.detach()), 1.0], dtype=torch.float64)
        return (loss, outputs) if return_outputs else loss

    # -- logs and checkpoints ---------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._sums[2] > 0 and "loss" in logs:
            logs = {**logs, "clean_loss": round(float(self._sums[0] / self._sums[2]), 6),
                    "adv_loss": round(float(self._sums[1] / self._sums[2]), 6)}
            self._sums.zero_()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        state = {"schedule": self._schedule.state_dict() if self._schedule is not None else None,
                 "micro": self._micro, "conadv": self.conadv.model_dump()}
        ckpt.atomic_save(state, folder / f"conadv_state_rank{self.args.process_index}.pt")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / f"conadv_state_rank{self.args.process_index}.pt"
        if path.is_file():
            self._pending_state = torch.load(path, map_location="cpu", weights_only=False)

    def training_step(self, model, inputs, num_items_in_batch=None):
        pending = getattr(self, "_pending_state", None)
        if pending is not None:
            schedule = self._schedule_for(dict(inputs))
            if pending["schedule"] is not None:
                schedule.load_state_dict(B.to_device(pending["schedule"], self.args.device))
            self._micro = tuple(pending["micro"])
            self._pending_state = None
        return super().training_step(model, inputs, num_items_in_batch)
