"""Runs on 2 CPU ranks: ConAdvTrainer with the Trainer's own DeepSpeed integration (the conadv
block read from the DeepSpeed config): logs, ≡ the plain Trainer when the attack vanishes, and
exact resume for τ = 1 and 2. Results (fp32 master weights, gathered) saved by rank 0."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

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


def run(out, stage, conadv, make, data=None, gas=1, max_steps=4, resume=None, save_steps=None, plain=False):
    """One Trainer run; the accelerate state of the previous run (its DeepSpeed plugin) is dropped,
    the gloo process group (created by the first ConAdvTrainingArguments) is kept."""
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
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.model_wrapped.zero_optimization_stage() == stage
    return trainer


def one_stage(out: str, stage: int) -> dict:
    result = {}
    make = models()["bert-mlm"][0]
    trainer = run(f"{out}/logs", stage, {**TEXT, "space": "embedding", "staleness": 1}, make)
    result.update(world=trainer.args.world_size, log=trainer.state.log_history, deepspeed=trainer.is_deepspeed_enabled,
                  stale_bytes=trainer._schedule.extra_bytes())
    bert = no_dropout_models()["bert"]
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
