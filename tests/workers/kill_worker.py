"""Saves a checkpoint, then dies by SIGKILL in the middle of the next save (--kill_in; same_tag:
the next save re-writes the same tag and dies between moving the old folder aside and moving the
new one in), or (--verify DIR...) loads each folder's latest checkpoint and writes, per rank, whether it is
the complete first one."""

import argparse
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import conadv_ds  # noqa: E402
import conadv_ds.checkpoint as ckpt  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from tests.common import digits_batches, ds_config, make_model, rank_slice  # noqa: E402


def die_on_call(module, name, after=0):
    """Replace module.name by a function that kills this process on its (after+1)-th call."""
    original, calls = getattr(module, name), [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, dying)


# os.replace on rank 0 during a save: its conadv state, conadv_run.json, then publish's moves
KILL_POINTS = {"deepspeed": (torch, "save", 0), "conadv_state": (ckpt, "atomic_save", 0),
               "publish": (os, "replace", 2), "latest": (ckpt, "write_latest", 0), "same_tag": (os, "replace", 3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt")
    parser.add_argument("--kill_in", choices=KILL_POINTS)
    parser.add_argument("--verify", nargs="+", metavar="DIR")
    args = parser.parse_args()
    if args.verify:
        for d in args.verify:  # a fresh engine per folder: nothing carries over from the previous load
            engine, *_ = conadv_ds.initialize(model=make_model(seed=7), config=ds_config(2, 1, {"staleness": 1}))
            engine.load_checkpoint(d)
            expected = torch.load(os.path.join(d, f"expected_rank{engine.global_rank}.pt"))
            got = [p.detach() for p in engine.module.parameters()]
            same = engine.global_steps == 2 and all(torch.equal(a, b) for a, b in zip(expected, got))
            verdict = "verified" if same else f"WRONG (step {engine.global_steps})"
            with open(os.path.join(d, f"verdict_rank{engine.global_rank}.txt"), "w") as f:
                f.write(f"{verdict} checkpoint {ckpt.read_latest(d)}")
        return
    engine, *_ = conadv_ds.initialize(model=make_model(), config=ds_config(2, 1, {"staleness": 1}))
    data = iter([rank_slice(mb, engine.global_rank) for step in digits_batches(6) for mb in step])
    for _ in range(2):
        engine.train_batch(data)
    tag = "kept" if args.kill_in == "same_tag" else None
    engine.save_checkpoint(args.ckpt, tag=tag)
    torch.save([p.detach().clone() for p in engine.module.parameters()],
               os.path.join(args.ckpt, f"expected_rank{engine.global_rank}.pt"))
    engine.train_batch(data)
    if engine.global_rank == 0 or args.kill_in in ("deepspeed", "conadv_state"):
        die_on_call(*KILL_POINTS[args.kill_in])
    engine.save_checkpoint(args.ckpt, tag=tag)
    print("second save completed", flush=True)


if __name__ == "__main__":
    run_launched(main)
