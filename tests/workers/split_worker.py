"""Runs on 2 or 3 CPU ranks: trains the small CNN with schedule 'split' (the same loop on every
rank, until the data ends), then, on the trainer ranks alone, with in-process ConAdv and the
same τ; saves final weights, the δ every trainer used, and the attacker's view of the run."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402

import conadv_ds  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from tests.common import (  # noqa: E402
    DETERMINISTIC,
    digits_batches,
    ds_config,
    make_model,
    rank_slice,
)

STEPS = 4
# Random starts and random target labels: split must reproduce the attack's seeded streams too.
RANDOMISED = {**DETERMINISTIC, "targeted": True, "clean_start_prob": 0.5}


def full_params(module) -> list[torch.Tensor]:
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone().float() for p in params]


def train(stage: int, conadv: dict, gas: int) -> dict:
    """The user loop, identical on trainer and attacker ranks."""
    engine, *_ = conadv_ds.initialize(model=make_model(), config=ds_config(stage, gas, {**RANDOMISED, **conadv}))
    data = None
    if not engine.is_attacker:
        data = iter([rank_slice(mb, engine.global_rank) for step in digits_batches(STEPS, gas) for mb in step])
    deltas, metrics = {}, []
    if not engine.is_attacker:
        prepare = engine.schedule.prepare

        def recording(step, pull):
            prepared = prepare(step, pull)
            deltas.update({(step, m): d.clone() for m, (_, d) in enumerate(prepared)})
            return prepared

        engine.schedule.prepare = recording
    while True:
        try:
            metrics.append(engine.train_batch(data))
        except StopIteration:
            break
    if engine.is_attacker:
        return {"metrics": metrics, "stale_bytes": engine.stale_bytes()}
    return {"params": full_params(engine.module), "deltas": deltas, "metrics": metrics,
            "world": torch.distributed.get_world_size(), "rank": engine.global_rank}


def resume(ckpt_dir: str, attackers) -> dict:
    """k split steps, save, fresh engines (trainers and attacker), load, k more: on trainers the
    weights to compare with the straight run of 2k steps (case "z2/tau1")."""
    conadv = {**RANDOMISED, "schedule": "split", "staleness": 1, "attacker_ranks": attackers}
    k = STEPS // 2
    first, *_ = conadv_ds.initialize(model=make_model(), config=ds_config(2, 1, conadv))
    data = None if first.is_attacker else [rank_slice(mb, first.global_rank) for step in digits_batches(STEPS)
                                           for mb in step]
    it = None if data is None else iter(data)
    for _ in range(k):
        first.train_batch(it)
    first.save_checkpoint(ckpt_dir)
    resumed, *_ = conadv_ds.initialize(model=make_model(seed=5), config=ds_config(2, 1, conadv))
    resumed.load_checkpoint(ckpt_dir)
    it = None if data is None else iter(data[resumed.micro_batches_pulled:])
    for _ in range(k):
        resumed.train_batch(it)
    return {} if resumed.is_attacker else {"params": full_params(resumed.module)}


CASES = {  # name: (ZeRO stage, staleness, gradient accumulation)
    "z2/tau1": (2, 1, 1),
    "z3/tau2/gas2": (3, 2, 2),
    "z0/tau2": (0, 2, 1),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--attackers", type=json.loads, required=True, help='conadv.attacker_ranks: "1" or "[0]"')
    parser.add_argument("--cases", nargs="+", choices=list(CASES), required=True)
    parser.add_argument("--resume_dir", help="also run the resume case (k + save + load + k steps)")
    args = parser.parse_args()
    launch_rank = int(os.environ["RANK"])
    results = {}
    for name in args.cases:
        stage, tau, gas = CASES[name]
        results[f"split/{name}"] = train(stage, {"schedule": "split", "staleness": tau,
                                                 "attacker_ranks": args.attackers}, gas)
    if args.resume_dir:
        results["resume"] = resume(args.resume_dir, args.attackers)
    if "params" in results[f"split/{args.cases[0]}"]:  # trainers: in-process ConAdv on the same world
        for name in args.cases:
            stage, tau, gas = CASES[name]
            results[f"inproc/{name}"] = train(stage, {"schedule": "conadv", "staleness": tau}, gas)
    torch.save(results, f"{args.out}.rank{launch_rank}")


if __name__ == "__main__":
    run_launched(main)
