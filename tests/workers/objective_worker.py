"""Runs on one rank: counts ConAdvEngine's calls of the objective during training."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import conadv_ds  # noqa: E402
from conadv_ds.bn import has_aux_bn  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from conadv_ds.objective import Objective  # noqa: E402
from conadv_ds.perturb import PixelSpace  # noqa: E402
from tests.common import digits_batches, ds_config, make_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    calls = [0]
    original = Objective.__call__

    def counted(obj, *args, **kwargs):
        calls[0] += 1
        return original(obj, *args, **kwargs)

    Objective.__call__ = counted
    steps, gas = 3, 2
    engine, *_ = conadv_ds.initialize(model=make_model(), config=ds_config(2, gas, {"staleness": 1}))
    data = iter([mb for step in digits_batches(steps + 1, gas) for mb in step])
    for _ in range(steps):
        engine.train_batch(data)
    aa, *_ = conadv_ds.initialize(model=make_model(), config=ds_config(2, 1, {"aux_bn": True}),
                                  perturb=PixelSpace(parts=2))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"calls": calls[0], "steps": steps, "gas": gas, "aa_branch": has_aux_bn(aa.module, "aa"),
                   "plain_adv_branch_only": has_aux_bn(engine.module, "aa")}, f)


if __name__ == "__main__":
    run_launched(main)
