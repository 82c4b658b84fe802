"""Runs on 2 CPU ranks: straight runs against save + fresh engine + load + continue, with ConAdv
on (random starts and targets), under ZeRO-2 and ZeRO-3; the non-finite-loss abort; and fp16
steps the loss scaler skips."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import conadv_ds  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from conadv_ds.fingerprint import weights_sha256  # noqa: E402
from tests.common import digits_batches, ds_config, make_model, rank_slice  # noqa: E402

K = 3
RANDOM_ATTACK = {"epsilon": 0.1, "step_size": 0.05, "steps": 2, "clean_start_prob": 0.3, "targeted": True}


def params(engine):
    import deepspeed

    ps = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(ps):
        return [p.detach().clone() for p in ps]


def engine_for(stage, conadv, seed):
    engine, *_ = conadv_ds.initialize(model=make_model(seed), config=ds_config(stage, 1, conadv))
    return engine


def data_for(rank):
    return [rank_slice(mb, rank) for step in digits_batches(2 * K + 2) for mb in step]


def resume_case(stage, conadv, ckpt_dir, drop_state=False):
    straight = engine_for(stage, conadv, seed=0)
    data = data_for(straight.global_rank)
    torch.manual_seed(11)
    it = iter(data)
    for _ in range(2 * K):
        straight.train_batch(it)
    expected = params(straight)

    first = engine_for(stage, conadv, seed=0)
    torch.manual_seed(11)
    it = iter(data)
    for _ in range(K):
        first.train_batch(it)
    first.save_checkpoint(ckpt_dir)
    if drop_state:
        torch.distributed.barrier()
        os.remove(f"{ckpt_dir}/global_step{K}/conadv_rank{first.global_rank}.pt")

    torch.manual_seed(999)  # the resumed run must restore every stream itself
    resumed = engine_for(stage, conadv, seed=5)
    resumed.load_checkpoint(ckpt_dir)
    it = iter(data[resumed.micro_batches_pulled:])
    for _ in range(K):
        resumed.train_batch(it)
    got = params(resumed)
    return {"equal": all(torch.equal(a, b) for a, b in zip(expected, got)),
            "sha": (weights_sha256(straight.module), weights_sha256(resumed.module), weights_sha256(first.module)),
            "max_diff": max((a - b).abs().max().item() for a, b in zip(expected, got)),
            "step": resumed.global_steps}


def nonfinite_case():
    engine = engine_for(2, {"schedule": "disadv", "max_nonfinite_steps": 2}, seed=0)
    x, y = rank_slice(digits_batches(1)[0][0], engine.global_rank)
    bad = iter([(torch.full_like(x, float("nan")), y)] * 5)
    steps = 0
    try:
        for _ in range(5):
            engine.train_batch(bad)
            steps += 1
    except FloatingPointError as e:
        return {"steps": steps, "message": str(e)}
    return {"steps": steps, "message": None}


FP16_STEPS = 12


def fp16_skip_case():
    """ZeRO-2 fp16 (DeepSpeed 0.19 scales the loss in `backward` for its ZeRO optimizers only) from a
    loss scale of 2^19, raised after every 2 good steps: steps overflow and are skipped, at the start and again later.
    Recorded: the key (step, micro-batch) of every attack; per trained micro-batch, the step it
    was trained at, its pixel sum and the key of the δ it was trained with (the same tensor)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    config = {**ds_config(2, 2, {"staleness": 1, **RANDOM_ATTACK}),
              "fp16": {"enabled": True, "initial_scale_power": 19, "loss_scale_window": 2}}
    engine, *_ = conadv_ds.initialize(model=model, config=config)
    stream = [rank_slice(mb, engine.global_rank) for step in digits_batches(2 * FP16_STEPS, gas=2) for mb in step]
    attacked, trained = [], []
    attack, objective = engine.schedule.attack, engine.objective

    def recording_attack(batch, step, micro):
        delta = attack(batch, step, micro)
        attacked.append(((step, micro), delta))
        return delta

    def recording_objective(forward, batch, delta):
        key = [k for k, d in attacked if d is delta]
        trained.append((engine.global_steps, float(batch[0].float().sum()), key))
        return objective(forward, batch, delta)

    engine.schedule.attack, engine.objective = recording_attack, recording_objective
    data = iter(stream)
    for _ in range(FP16_STEPS):
        engine.train_batch(data)
    return {"skipped": engine.ds.skipped_steps, "steps": engine.global_steps, "attacked": [k for k, _ in attacked],
            "trained": trained, "stream": [float(x.half().float().sum()) for x, _ in stream]}


def load_error(stage, conadv, ckpt_dir):
    """The error of loading `ckpt_dir` into an engine with these settings (None: it loaded)."""
    engine = engine_for(stage, conadv, seed=0)
    try:
        engine.load_checkpoint(ckpt_dir)
    except conadv_ds.ConfigError as e:
        return str(e)
    return None


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tamper_cases(ckpt_dir, stage):
    """For each kind of file in the ZeRO-`stage` checkpoint `ckpt_dir/la<stage>` (ours per rank,
    DeepSpeed's model states, optimizer states): a copy of the folder with that file replaced by a
    code-running pickle (or cut in half) is loaded by every rank: the error and whether the code ran."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    src = Path(ckpt_dir) / f"la{stage}"
    tag = (src / "latest").read_text().strip()
    model = "mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_1_mp_rank_00_model_states.pt"
    files = {"ours": "conadv_rank1.pt", "model": model, "optimizer": "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    out = {}
    for kind, name in [*((k, n) for k, n in files.items()), ("truncated", files["optimizer"])]:
        dst, marker = Path(ckpt_dir) / f"tamper{stage}_{kind}", Path(ckpt_dir) / f"ran{stage}_{kind}"
        if dist.get_rank() == 0:
            shutil.copytree(src, dst)
            target = dst / tag / name
            if kind == "truncated":
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            else:
                torch.save({"state": RunsCode(marker)}, target)
        dist.barrier()
        out[kind] = {"error": load_error(stage, {"staleness": 1, **RANDOM_ATTACK}, str(dst)), "file": name,
                     "ran": marker.exists()}
        dist.barrier()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--try_load", action="store_true", help="load ckpt/sn2 with its own settings; print the error")
    args = parser.parse_args()
    if args.try_load:
        print(f"load error: {load_error(2, {'staleness': 2, **RANDOM_ATTACK}, f'{args.ckpt}/sn2')}", flush=True)
        return
    results = {}
    for stage in (2, 3):
        results[f"lookahead/z{stage}"] = resume_case(stage, {"staleness": 1, **RANDOM_ATTACK},
                                                     f"{args.ckpt}/la{stage}")
        results[f"snapshot2/z{stage}"] = resume_case(stage, {"staleness": 2, **RANDOM_ATTACK},
                                                     f"{args.ckpt}/sn{stage}")
    results["lookahead/z2/without_state"] = resume_case(2, {"staleness": 1, **RANDOM_ATTACK}, f"{args.ckpt}/nostate",
                                                        drop_state=True)
    results["nonfinite"] = nonfinite_case()
    results["fp16"] = fp16_skip_case()
    results["tampered/z2"] = tamper_cases(args.ckpt, 2)
    results["tampered/z3"] = tamper_cases(args.ckpt, 3)
    results["load_tau1_from_tau2"] = load_error(2, {"staleness": 1, **RANDOM_ATTACK}, f"{args.ckpt}/sn2")
    results["load_disadv_from_tau2"] = load_error(2, {"schedule": "disadv", "staleness": 0, **RANDOM_ATTACK}, f"{args.ckpt}/sn2")
    torch.save(results, f"{args.out}.rank{torch.distributed.get_rank()}")


if __name__ == "__main__":
    run_launched(main)
