"""Runs on 2 CPU ranks: LARS and LAMB through conadv_ds.initialize under ZeRO 0-3, plus a
"naive" run whose optimizer is not told the ZeRO layout (trust ratios per partition)."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402

import conadv_ds  # noqa: E402
from tests.test_optim import MICRO, OPTIMIZERS, make_mlp, mlp_batches  # noqa: E402


def run(stage, name, naive=False):
    model = make_mlp()
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": stage}, "optimizer": OPTIMIZERS[name]}
    engine, *_ = conadv_ds.initialize(model=model, config=cfg)
    if naive:
        engine.optimizer.optimizer.bind_layouts({})
    rank = engine.global_rank
    for x, y in mlp_batches():
        xs, ys = x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO]
        engine.train_batch(iter([(xs, ys)]))
    ps = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(ps):
        return [p.detach().clone() for p in ps]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {f"{name}/z{stage}": run(stage, name) for stage in (0, 1, 2, 3) for name in OPTIMIZERS}
    results["LARS/z2/naive"] = run(2, "LARS", naive=True)
    results["LAMB/z1/naive"] = run(1, "LAMB", naive=True)
    if torch.distributed.get_rank() == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
