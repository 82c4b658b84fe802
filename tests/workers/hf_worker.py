"""Runs on 2 CPU ranks: ConAdvTrainer with the Trainer's own DeepSpeed ZeRO-3 integration, the
conadv block read from the DeepSpeed config."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from conadv_ds.hf import ConAdvTrainer, ConAdvTrainingArguments  # noqa: E402
from tests.test_hf_trainer import TEXT, models  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
          "gradient_clipping": 0.0, "zero_optimization": {"stage": 3},
          "conadv": {**TEXT, "space": "embedding", "staleness": 1}}
    targs = ConAdvTrainingArguments(args.out, per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                                    report_to=[], use_cpu=True, seed=0, learning_rate=5e-3, save_strategy="no",
                                    max_grad_norm=0.0, deepspeed=ds)
    make, data, _ = models()["bert-mlm"]
    torch.manual_seed(0)
    trainer = ConAdvTrainer(model=make(), args=targs, train_dataset=data)
    trainer.train()
    if trainer.args.process_index == 0:
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump({"world": trainer.args.world_size, "log": trainer.state.log_history,
                       "deepspeed": trainer.is_deepspeed_enabled,
                       "stage": trainer.model_wrapped.zero_optimization_stage(),
                       "stale_bytes": trainer._schedule.extra_bytes()}, f)


if __name__ == "__main__":
    main()
