"""Rank 1 raises in the middle of training while rank 0 goes on into the next step's collectives."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import conadv_ds  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from tests.common import digits_batches, ds_config, make_model, rank_slice  # noqa: E402


def main():
    engine, *_ = conadv_ds.initialize(model=make_model(), config=ds_config(3, 1, {"staleness": 1}))
    data = iter([rank_slice(mb, engine.global_rank) for step in digits_batches(50) for mb in step])
    for step in range(50):
        if step == 2 and engine.global_rank == 1:
            raise RuntimeError("simulated failure on rank 1")
        engine.train_batch(data)


if __name__ == "__main__":
    run_launched(main)
