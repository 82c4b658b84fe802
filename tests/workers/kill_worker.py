"""Saves a checkpoint, then dies by SIGKILL in the middle of the next save (--kill_in), or
(--verify DIR...) loads each folder's latest checkpoint and writes, per rank, whether it is the
complete first one.

Kill points: `deepspeed` and `conadv_state` half-way through writing a file (DeepSpeed's model
states; every rank's own ConAdv state): the file has bytes but is incomplete; `publish` as the
new folder is moved into place; `same_tag` (the save re-writes the tag it keeps) between moving
the old folder aside and moving the new one in; `latest` with the new `latest` written to its
temporary file, before it replaces the old one."""

import argparse
import io
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import conadv_ds  # noqa: E402
import conadv_ds.checkpoint as ckpt  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from tests.common import digits_batches, ds_config, make_model, rank_slice  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def die_mid_write(name_matches):
    """Replace torch.save by one that writes the first half of the bytes of the first file whose
    name `name_matches`, flushes them to disk and kills this process."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and name_matches(Path(f).name):
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            die()
        return original(obj, f, *args, **kwargs)

    torch.save = save


def die_on_replace(paths_match):
    """Replace os.replace by one that kills this process, before moving anything, at the first
    call whose (source, destination) `paths_match`."""
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if paths_match(Path(src), Path(dst)):
            die()
        return original(src, dst, *args, **kwargs)

    os.replace = replace


KILL_POINTS = {
    "deepspeed": lambda: die_mid_write(lambda name: name.endswith("model_states.pt")),
    "conadv_state": lambda: die_mid_write(lambda name: name.startswith(".conadv_rank")),
    "publish": lambda: die_on_replace(lambda src, dst: src.name.endswith(ckpt.PARTIAL)),
    "same_tag": lambda: die_on_replace(lambda src, dst: src.name.endswith(ckpt.PARTIAL)),
    "latest": lambda: die_on_replace(lambda src, dst: dst.name == ckpt.LATEST),
}
EVERY_RANK = ("deepspeed", "conadv_state")
"""Kill points armed on every rank (each writes its own files); the others only on rank 0, which
moves folders and writes `latest`."""


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
    if engine.global_rank == 0 or args.kill_in in EVERY_RANK:
        KILL_POINTS[args.kill_in]()
    engine.save_checkpoint(args.ckpt, tag=tag)
    print("second save completed", flush=True)


if __name__ == "__main__":
    run_launched(main)
