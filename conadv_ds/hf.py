"""ConAdv for the Hugging Face Trainer: one import away.

    from conadv_ds.hf import ConAdvTrainer, ConAdvTrainingArguments

    args = ConAdvTrainingArguments("out", conadv={"norm": "l2", "epsilon": 1.0},
                                   deepspeed="ds_config.json")       # or a "conadv" block in that JSON
    ConAdvTrainer(model=model, args=args, train_dataset=ds).train()

Each training micro-batch is trained on the one objective (`objective.py`) with the Trainer's
own loss path for both halves — its `compute_loss` with label smoothing, `compute_loss_func`
and `num_items_in_batch` — and its single backward, so that with ε → 0 it trains exactly like
`Trainer`. The Trainer hands out one micro-batch at a time, so old weights come from sharded
snapshots: δ_t is computed from w_{t-τ}. The space follows the model (`perturb.resolve_space`):
word-embedding output for models with a word embedding, `pixel_values` otherwise, clipped only
where `clip_range` is set. `clean_loss` and `adv_loss` (averaged over ranks) appear in the logs;
the ConAdv state is saved with every checkpoint and restored by `resume_from_checkpoint`, with
or without DeepSpeed.
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
from .config import CONADV_KEY, ConAdvConfig, load_json, parse_conadv, without_timer_syncs
from .errors import ConfigError
from .objective import Objective, StepMetrics
from .perturb import resolve_space
from .schedule import build_schedule
from .stale import check_zero_support


def merge_conadv(explicit: Union[dict, str, None], deepspeed: Union[dict, str, None]) -> ConAdvConfig:
    """The `conadv` argument (a block, inline JSON, or a JSON file / dict holding one) over the
    `conadv` block of the DeepSpeed config; a key set differently in both places is an error."""
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
    """`TrainingArguments` plus `conadv` (a dict, inline JSON or a JSON path; the `conadv` block of
    the DeepSpeed config named by `deepspeed` is used too)."""

    conadv: Optional[Union[dict, str]] = field(default=None, metadata={
        "help": "the conadv block: inline JSON (e.g. '{\"epsilon\": 0.1}') or a JSON file"})

    def __post_init__(self):
        self.conadv_config = merge_conadv(self.conadv, self.deepspeed if isinstance(self.deepspeed, (str, dict))
                                          else None)
        if self.conadv_config.enabled:
            self.conadv = self.conadv_config.model_dump()  # to_dict() / to_json_string() carry the effective block
        if self.conadv_config.adversarial and self.conadv_config.schedule == "split":
            raise ConfigError("conadv.schedule='split': the Trainer runs 'disadv' and 'conadv'; attacker ranks "
                              "are available through conadv_ds.initialize")
        if isinstance(self.deepspeed, (str, Path, dict)):
            ds = load_json(self.deepspeed)
            ds.pop(CONADV_KEY, None)
            check_zero_support(self.conadv_config, ds, whole_steps=False)
            self.deepspeed = without_timer_syncs(ds)
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


def _state_file(folder: Union[str, Path], rank: int) -> Path:
    return Path(folder) / f"conadv_state_rank{rank}.pt"


class ConAdvTrainer(Trainer):
    """A `Trainer` whose training loss includes adversarial copies of each micro-batch."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conadv: ConAdvConfig = getattr(self.args, "conadv_config", None) or parse_conadv(None)
        self._schedule = None
        self._objective: Optional[Objective] = None
        self._micro = (-1, 0)  # (step, index of the next micro-batch within it)
        self._stats = StepMetrics()
        self._resume_from: Optional[str] = None
        self._log_scale = 1
        """Micro-batch losses normalised over the accumulated batch sum to the Trainer's logged
        loss: their mean is scaled by the accumulation steps to be logged in the same units."""

    # -- the attack ----------------------------------------------------------------------------
    def _build(self) -> None:
        """Space, schedule and objective, built at the first training micro-batch (the model is
        wrapped by then: DeepSpeed's engine holds the shards the snapshots keep)."""
        module = self.accelerator.unwrap_model(self.model)
        space = resolve_space(self.conadv, module)
        engine = self.model_wrapped if self.is_deepspeed_enabled else module
        self._schedule = build_schedule(self.conadv, space, engine, module, rank=self.args.process_index,
                                        autocast=self.autocast_smart_context_manager, whole_steps=False)
        self._objective = Objective(space, self.conadv.adv_weight, module, self.conadv.aux_bn)
        if self._resume_from is not None:
            self._load_conadv_state(self._resume_from)
            self._resume_from = None

    def _delta(self, inputs) -> Optional[torch.Tensor]:
        step = self.state.global_step
        micro = self._micro[1] if self._micro[0] == step else 0
        self._micro = (step, micro + 1)
        last = micro + 1 >= self.args.gradient_accumulation_steps
        return self._schedule.attack_micro(step, micro, inputs, last)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not (self.conadv.adversarial and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._schedule is None:
            self._build()
        inputs = dict(inputs)
        delta = self._delta(inputs)

        def forward(batch):  # the Trainer's own loss path (it pops labels: hand it a copy)
            return super(ConAdvTrainer, self).compute_loss(model, dict(batch), True, num_items_in_batch)

        micro = self._objective(forward, inputs, delta)
        self._stats.add(micro.stats)
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        self._log_scale = self.current_gradient_accumulation_steps if scaled else 1
        return (micro.loss, None) if return_outputs else micro.loss

    # -- logs and checkpoints ---------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._stats.micro and "loss" in logs:  # every rank logs at the same steps: the reduction is safe
            m = self._stats.read()
            logs = {**logs, **{k: round(m[k] * self._log_scale, 6) for k in ("clean_loss", "adv_loss") if k in m}}
        super().log(logs, *args, **kwargs)

    def _state_identity(self) -> dict:
        return ckpt.run_identity(self.conadv.model_dump(), self.args.world_size)

    def _save_checkpoint(self, model, trial) -> None:
        """The ConAdv state goes in first: the Trainer deletes older checkpoints (save_total_limit)
        at the end of its own save, and the one left must be resumable."""
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {"schedule": self._schedule.state_dict() if self._schedule is not None else None,
                 "micro": self._micro, **self._state_identity()}
        ckpt.atomic_save(state, _state_file(folder, self.args.process_index))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """`Trainer.train`; a resumed run also restores the ConAdv state saved beside the checkpoint
        (on the Trainer's DeepSpeed path too, which bypasses `_load_from_checkpoint`)."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            ckpt.check_files(Path(resume_from_checkpoint))  # every *.pt, before the Trainer or DeepSpeed loads one
            self._resume_from = str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_conadv_state(self, folder: str) -> None:
        path = _state_file(folder, self.args.process_index)
        if not path.is_file():
            if self.conadv.adversarial:
                raise FileNotFoundError(f"checkpoint {folder!r}: no {path.name}; it was not saved by ConAdvTrainer "
                                        "with this world size")
            return
        state = ckpt.load_state(path)
        ckpt.check_same_run(state, self._state_identity(), folder)
        if state["schedule"] is not None:
            self._schedule.load_state_dict(B.to_device(state["schedule"], self.args.device))
        self._micro = tuple(state["micro"])
