"""The large-batch study: test accuracy against batch size, LARS alone vs DisAdv vs ConAdv
(vs ConAdv + AutoAugment), on real data (Fashion-MNIST) at a fixed epoch budget, 2 CPU ranks.

Every (method, batch) cell trains a small ResNet from the same initialisation with LARS, linear
warmup and polynomial decay, the learning rate scaled by the square-root rule from batch 256,
then evaluates clean test top-1. Rows are appended to `<out>/results.csv` as they finish, so an
interrupted study resumes where it stopped; `<out>/results.md` and `<out>/accuracy_vs_batch.png`
are written at the end.

    python benchmarks/large_batch.py                  # the full grid (about 80 minutes on 2 CPU cores)
    python benchmarks/large_batch.py --quick          # a few minutes, no accuracy claims
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]

from harness import ensure_ranks, rank0  # noqa: E402

METHODS = {
    "lars": {"enabled": False},
    "disadv": {"schedule": "disadv"},
    "conadv": {"schedule": "conadv", "staleness": 1},
    "conadv+aa": {"schedule": "conadv", "staleness": 1, "adv_weight": 1 / 3},
}
ATTACK = {"epsilon": 8 / 255, "step_size": 8 / 255, "steps": 1, "targeted": True, "clean_start_prob": 0.2,
          "aux_bn": True}
FIELDS = ["method", "batch", "epochs", "steps", "test_top1", "train_loss", "seconds"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/large_batch")
    p.add_argument("--batches", default="128,512,2048,8192,16384")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--train_size", type=int, default=60000, help="first N training images")
    p.add_argument("--image_size", type=int, default=14, help="images are average-pooled to this size")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--base_lr", type=float, default=2.0, help="LARS lr at batch 256 (sqrt rule)")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--quick", action="store_true", help="tiny grid on the digits, for smoke tests")
    args = p.parse_args()
    if args.quick:
        args.dataset, args.batches, args.epochs, args.image_size, args.train_size = "digits", "64,256", 2, 8, 1024
    return args


def done_cells(path: Path) -> set:
    if not path.is_file():
        return set()
    with open(path) as f:
        return {(r["method"], int(r["batch"])) for r in csv.DictReader(f)}


def main() -> None:
    args = parse_args()
    ensure_ranks()

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import Subset, TensorDataset
    from tqdm import tqdm

    import conadv_ds
    from conadv_ds.data import vision as data
    from conadv_ds.perturb import PixelSpace
    from conadv_ds.vision import Normalize, SmallResNet, evaluate

    import deepspeed

    deepspeed.init_distributed()
    images = data.load(args.dataset, None)

    def pooled(ds):
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        if x.shape[-1] != args.image_size:
            x = F.adaptive_avg_pool2d(x, args.image_size)
        return TensorDataset(x, y)

    train_full, test = pooled(Subset(images.train, range(min(args.train_size, len(images.train))))), pooled(images.val)
    out = Path(args.out)
    if rank0():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    results = out / "results.csv"
    finished = done_cells(results)
    grid = [(m, int(b)) for b in args.batches.split(",") for m in args.methods.split(",")]
    todo = [cell for cell in grid if cell not in finished]
    rank, world = dist.get_rank(), dist.get_world_size()
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), disable=not rank0(), desc="study")
    for method, batch in todo:
        aa = method.endswith("+aa")
        train = data.with_autoaugment(data.ImageData("", train_full, test, 10, 1, args.image_size, (0.5,), (0.5,))
                                      ).train if aa else train_full
        micro = batch // world
        steps_per_epoch = len(train_full) // batch
        steps = max(1, round(args.epochs * steps_per_epoch))
        cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro, "gradient_clipping": 0.0,
               "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 2},
               "optimizer": {"type": "LARS", "params": {"lr": args.base_lr, "momentum": 0.9, "weight_decay": 5e-4,
                                                        "trust_coefficient": 0.001}},
               "lr_scaling": {"rule": "sqrt", "reference_batch_size": 256},
               "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_ratio": 0.2, "total_num_steps": steps,
                                                                   "power": 2.0}},
               "conadv": {**ATTACK, **METHODS[method]}}
        torch.manual_seed(0)
        model = torch.nn.Sequential(Normalize(images.mean, images.std), SmallResNet(10, 1, width=args.width))
        engine, *_ = conadv_ds.initialize(model=model, config=cfg, perturb=PixelSpace(parts=2 if aa else 1))
        stream = data.train_stream(train, micro // 2 if aa else micro, rank, world, seed=0,
                                   collate_fn=data.concat_views if aa else None)
        start, losses = time.time(), []
        for _ in range(steps):
            losses.append(engine.train_batch(stream)["loss"])
        res = evaluate(engine.module, data.eval_loader(test, 1000, rank, world), epsilon=0.0, steps=0)
        row = {"method": method, "batch": batch, "epochs": args.epochs, "steps": steps,
               "test_top1": round(res["top1"], 4), "train_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4),
               "seconds": round(time.time() - start, 1)}
        if rank0():
            new = not results.is_file()
            with open(results, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    w.writeheader()
                w.writerow(row)
            bar.write(json.dumps(row))
        bar.update(1)
        del engine
    bar.close()
    if rank0():
        report(results, out)


def report(results: Path, out: Path) -> None:
    """Markdown table, the PNG plot, and the share of the small-vs-large gap ConAdv closes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results) as f:
        rows = list(csv.DictReader(f))
    acc = {(r["method"], int(r["batch"])): float(r["test_top1"]) for r in rows}
    secs = {(r["method"], int(r["batch"])): float(r["seconds"]) for r in rows}
    methods = [m for m in METHODS if any(k[0] == m for k in acc)]
    batches = sorted({b for _, b in acc})
    lines = ["| batch | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for b in batches:
        lines.append(f"| {b} | " + " | ".join(f"{acc[m, b]:.4f} ({secs[m, b]:.0f} s)" if (m, b) in acc else "–"
                                            for m in methods) + " |")
    small, large = batches[0], batches[-1]
    summary = []
    if ("lars", small) in acc and ("lars", large) in acc:
        gap = acc["lars", small] - acc["lars", large]
        for m in methods[1:]:
            if (m, large) in acc:
                closed = (acc[m, large] - acc["lars", large]) / gap if gap > 0 else float("nan")
                summary.append(f"{m} at batch {large}: {acc[m, large]:.4f} vs LARS {acc['lars', large]:.4f}; "
                               f"closes {closed:.0%} of the batch-{small}-vs-{large} LARS gap ({gap:.4f})")
    (out / "results.md").write_text("\n".join(lines + [""] + [f"- {s}" for s in summary]) + "\n")
    print("\n".join(lines + summary), flush=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        xs = [b for b in batches if (m, b) in acc]
        ax.plot(xs, [acc[m, b] for b in xs], "o-", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test top-1")
    ax.set_title("Fixed epoch budget, LARS + sqrt LR scaling")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_batch.png", dpi=110)


if __name__ == "__main__":
    main()
