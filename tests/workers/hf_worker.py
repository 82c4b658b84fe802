"""Runs on 2 CPU ranks: ConAdvTrainer with the Trainer's own DeepSpeed integration (the conadv
block read from the DeepSpeed config): δ and the weights each step starts from at τ = 2, every
rank's loss parts beside the logs, the bytes the snapshots hold, ≡ the plain Trainer when the
attack vanishes, and exact resume for τ = 1 and 2. Results (fp32 master weights, gathered) saved
by rank 0."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from conadv_ds.cli import run_launched  # noqa: E402
from conadv_ds.hf import ConAdvTrainer, ConAdvTrainingArguments  # noqa: E402
from tests.test_hf_trainer import TEXT, VANISHING, models, no_dropout_models, text_data  # noqa: E402


def ds_config(stage, conadv=None, gas=1):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "train_batch_size": 8 * gas,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}}
    return {**cfg, "conadv": conadv} if conadv is not None else cfg


def fp32_weights(trainer):
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for p in trainer.model_wrapped.module.parameters()]


def run(out, stage, conadv, make, data=None, gas=1, max_steps=4, resume=None, save_steps=None, plain=False,
        before_train=None):
    """One Trainer run; the accelerate state of the previous run (its DeepSpeed plugin) is dropped,
    the gloo process group (created by the first ConAdvTrainingArguments) is kept. `before_train`
    gets the trainer before it trains."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    AcceleratorState._reset_state(reset_partial_state=False)

    common = dict(per_device_train_batch_size=4, max_steps=max_steps, logging_steps=2, report_to=[], use_cpu=True,
                  seed=0, learning_rate=5e-3, max_grad_norm=0.0, gradient_accumulation_steps=gas,
                  save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                  deepspeed=ds_config(stage, None if plain else conadv, gas))
    if plain:  # the plain Trainer on the gloo state the first ConAdvTrainingArguments created
        args = TrainingArguments(out, accelerator_config={"use_configured_state": True}, **common)
    else:
        args = ConAdvTrainingArguments(out, **common)
    torch.manual_seed(0)
    cls = Trainer if plain else ConAdvTrainer
    trainer = cls(model=make(), args=args, train_dataset=data or text_data())
    if before_train is not None:
        before_train(trainer)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.model_wrapped.zero_optimization_stage() == stage
    return trainer


STALE = {**TEXT, "space": "embedding", "staleness": 2, "clean_start_prob": 1.0}
"""τ = 2 and an attack a test can write out: one untargeted L2 step from δ = 0."""


class WeightsAtStepBegin(TrainerCallback):
    """The full weights each optimizer step starts from (gathered under ZeRO-3: every rank calls it)."""

    def __init__(self):
        self.weights = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            self.weights.append([p.detach().clone() for p in params])


class Recording:
    """Installed on a trainer before it trains: the weights at each step's start, this rank's
    micro-batches with their δ, and this rank's clean and adversarial loss of every micro-batch."""

    def __init__(self, trainer):
        self.at_step_begin, self.steps, self.losses = WeightsAtStepBegin(), [], []
        trainer.add_callback(self.at_step_begin)
        attack, add = trainer._delta, trainer._stats.add

        def recording_attack(inputs):
            delta = attack(inputs)
            self.steps.append({"step": trainer.state.global_step, "batch": {k: v.clone() for k, v in inputs.items()},
                               "delta": delta.clone()})
            return delta

        def recording_stats(stats):
            self.losses.append((float(stats.clean_loss), float(stats.adv_loss)))
            add(stats)

        trainer._delta, trainer._stats.add = recording_attack, recording_stats


def snapshot_bytes(trainer, stage: int) -> dict:
    """What one snapshot of this rank must hold: its share of the live weights (its ZeRO-3 shards,
    or its ZeRO-2 flat partitions) and the module's buffers; and the whole model's weights."""
    engine = trainer.model_wrapped
    params = list(engine.module.parameters())
    if stage == 3:
        shards = [p.ds_tensor for p in params]
        model = sum(p.ds_numel * p.element_size() for p in params)
    else:
        shards = [parts[dist.get_rank()] for parts in engine.optimizer.parallel_partitioned_bit16_groups]
        model = sum(p.numel() * p.element_size() for p in params)
    return {"shard": sum(t.numel() * t.element_size() for t in shards), "model": model,
            "buffers": sum(b.numel() * b.element_size() for b in engine.module.buffers()),
            "held": trainer._schedule.extra_bytes()}


def gathered(obj) -> list:
    """`obj` of every rank, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def one_stage(out: str, stage: int) -> dict:
    make, bert = models()["bert-mlm"][0], no_dropout_models()["bert"]
    recordings = []
    trainer = run(f"{out}/logs", stage, STALE, bert, max_steps=6, before_train=lambda t: recordings.append(Recording(t)))
    (rec,) = recordings
    result = dict(world=trainer.args.world_size, log=trainer.state.log_history, deepspeed=trainer.is_deepspeed_enabled,
                  snapshots=gathered(snapshot_bytes(trainer, stage)), losses=gathered(rec.losses),
                  staleness={"weights": rec.at_step_begin.weights, "steps": rec.steps,
                             "config": trainer.model_wrapped.module.config.to_dict()})
    plain = fp32_weights(run(f"{out}/plain", stage, None, bert, gas=2, plain=True))
    vanishing = fp32_weights(run(f"{out}/vanishing", stage, VANISHING, bert, gas=2))
    result["vanishing_max_diff"] = max(float((a - b).abs().max()) for a, b in zip(plain, vanishing))
    for tau in (1, 2):
        block = {**TEXT, "staleness": tau}
        straight = run(f"{out}/straight{tau}", stage, block, make, max_steps=6, save_steps=3)
        resumed = run(f"{out}/resumed{tau}", stage, block, make, max_steps=6,
                      resume=f"{out}/straight{tau}/checkpoint-3")
        a, b = fp32_weights(straight), fp32_weights(resumed)
        result[f"resume_tau{tau}_max_diff"] = max(float((x - y).abs().max()) for x, y in zip(a, b))
        result[f"resume_tau{tau}_moved"] = max(float((x - y).abs().max())
                                               for x, y in zip(a, fp32_weights(run(f"{out}/short{tau}", stage, block,
                                                                                   make, max_steps=3))))
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", required=True)
    args = parser.parse_args()
    result = {stage: one_stage(f"{args.out}/zero{stage}", stage) for stage in args.stages}
    if int(os.environ["RANK"]) == 0:
        torch.save(result, os.path.join(args.out, "result.pt"))


if __name__ == "__main__":
    run_launched(main)
