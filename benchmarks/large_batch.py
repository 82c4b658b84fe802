"""The large-batch study: a generalization gap on real data, and how much of it each method closes.

Fashion-MNIST, a small training subset average-pooled to 14×14, a small ResNet, LARS with linear
warmup and polynomial decay, the learning rate scaled from batch 256 by the square-root rule, the
same number of epochs at every batch size, 2 CPU ranks. The subset is small enough that every
batch size fits it (train accuracy near 100%), so what separates the batches is test accuracy.

Methods (every one is LARS underneath):

- `lars`      plain LARS;
- `lars+ls`   LARS with label-smoothed cross-entropy (0.1): the cheap regulariser a user might
              pick instead of an adversarial term;
- `disadv`    adversarial training with the current weights (attack, then train: 2 sequential passes);
- `conadv`    ConAdv, the attack made with weights τ=1 step old;
- `conadv+aa` ConAdv + AutoAugment: clean, AutoAugment and adversarial views of the SAME images
              (as many distinct images per step as every other cell), each 1/3 of the loss. These
              cells run last; rerun them alone with `--redo conadv+aa`.

Plus an ε sweep of ConAdv at the largest batch. Every (method, batch, ε, seed) cell trains from the
seed's initialisation, data order and attack stream, then evaluates clean top-1 on the test set and
on the training subset (eval mode). Rows are appended to `<output_dir>/results.csv` as they finish;
a rerun skips the cells already there. `results.md`, `summary.json` and `accuracy_vs_batch.png` are
written at the end (or with `--report_only`).

    python benchmarks/large_batch.py --output_dir runs/large_batch   # the full grid (~2 h on 2 shared cores)
    python benchmarks/large_batch.py --quick --output_dir /tmp/q     # smoke test on the digits, < 1 min
    python benchmarks/large_batch.py --output_dir runs/large_batch --redo conadv+aa   # drop + rerun AA cells
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from harness import ensure_ranks, rank0
from study_report import Study, append_row, check_settings, read_rows, report

METHODS = {
    "lars": {"enabled": False},
    "lars+ls": {"enabled": False},
    "disadv": {"schedule": "disadv"},
    "conadv": {"schedule": "conadv", "staleness": 1},
    "conadv+aa": {"schedule": "conadv", "staleness": 1, "adv_weight": 1 / 3},
}
ADVERSARIAL = ("disadv", "conadv", "conadv+aa")
LABEL_SMOOTHING = 0.1
ATTACK = {"steps": 1, "targeted": True, "clean_start_prob": 0.2, "aux_bn": True}
KEY = ("method", "batch", "eps255", "seed")
FIELDS = [*KEY, "epochs", "steps", "train_size", "test_top1", "train_top1", "train_loss", "seconds",
          "eval_seconds"]
# what a row's numbers depend on besides its key: a resumed study must not mix settings
STUDY = Study(reference="lars", methods=tuple(METHODS), adversarial=ADVERSARIAL, eps_label="ε (/255)",
              test="test_top1", train="train_top1", eps="eps255")
SETTINGS = ("dataset", "train_size", "image_size", "width", "epochs", "base_lr", "lr_rule", "weight_decay",
            "momentum", "warmup", "power", "zero_stage")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", "--out", dest="output_dir", default="runs/large_batch")
    p.add_argument("--batches", default="64,128,512,1024",
                   help="global batch sizes; the smallest is the small-batch reference of the gap")
    p.add_argument("--method_batches", default="512,1024",
                   help="the batches every method runs at (10%% and 20%% of the subset); the others run only "
                        "--reference_methods; 'all' for every batch")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reference_methods", default="lars",
                   help="the methods (of --methods) run at the batches outside --method_batches")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eps", type=float, default=8, help="ε (= PGD step) on the 0-255 scale")
    p.add_argument("--eps_sweep", default="4,16", help="extra ConAdv ε values (0-255) at the largest batch")
    p.add_argument("--epochs", type=float, default=60)
    p.add_argument("--train_size", type=int, default=5120, help="first N training images")
    p.add_argument("--image_size", type=int, default=14, help="images are average-pooled to this size")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--base_lr", type=float, default=6.0, help="LARS lr at batch 256")
    p.add_argument("--lr_rule", default="sqrt", choices=["sqrt", "linear"])
    p.add_argument("--weight_decay", type=float, default=5e-5)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--power", type=float, default=2.0, help="polynomial decay power")
    p.add_argument("--zero_stage", type=int, default=2, help="ZeRO stage (the same numbers at any stage)")
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--redo", default="", help="methods whose rows are removed from the CSV (backed up) and rerun")
    p.add_argument("--report_only", action="store_true", help="write the report from the CSV, train nothing")
    p.add_argument("--quick", action="store_true", help="tiny grid on the digits, for smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.batches, args.epochs, args.image_size, args.train_size = "digits", "64,256", 2, 8, 1024
        args.method_batches = "256"
        args.seeds, args.eps_sweep, args.base_lr = "0,1", "4", 2.0
    return args


def fmt_eps(v: float) -> str:
    return f"{float(v):g}"


def build_grid(args) -> list[tuple[str, int, str, int]]:
    """Cells as (method, batch, eps255, seed), seed-major so that a partial study covers every cell
    of the first seeds; all conadv+aa cells come last."""
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    batches = sorted(int(b) for b in args.batches.split(","))
    at_ref = args.reference_methods.split(",")
    full = batches if args.method_batches == "all" else [int(b) for b in args.method_batches.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep = [fmt_eps(e) for e in args.eps_sweep.split(",") if e and fmt_eps(e) != fmt_eps(args.eps)]

    def eps_of(m):
        return fmt_eps(args.eps) if m in ADVERSARIAL else "0"

    grid = []
    for phase in ("main", "aa"):
        for seed in seeds:
            for b in batches:
                for m in methods:
                    if (m == "conadv+aa") == (phase == "aa") and (b in full or m in at_ref):
                        grid.append((m, b, eps_of(m), seed))
            if phase == "main" and "conadv" in methods:
                grid += [("conadv", max(batches), e, seed) for e in sweep]
    return grid


def key_of(row: dict) -> tuple[str, int, str, int]:
    return row["method"], int(row["batch"]), fmt_eps(row["eps255"]), int(row["seed"])


def redo(results: Path, methods: list[str]) -> int:
    """Remove the rows of `methods` from the CSV (the old file kept as results.csv.bak)."""
    rows = read_rows(results)
    keep = [r for r in rows if r["method"] not in methods]
    if len(keep) == len(rows):
        return 0
    results.replace(results.with_suffix(".csv.bak"))
    with open(results, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(keep)
    return len(rows) - len(keep)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    results = out / "results.csv"
    if args.report_only:
        report(STUDY, read_rows(results), out, subtitle(read_rows(results)))
        return
    grid = build_grid(args)
    if not os.environ.get("LARGE_BATCH_PREPARED") and rank0():
        # once per study, before any rank starts: refuse other settings, drop the rows to redo
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out, {k: getattr(args, k) for k in SETTINGS})
        if args.redo:
            n = redo(results, args.redo.split(","))
            print(f"--redo {args.redo}: removed {n} rows (old CSV kept as {results.with_suffix('.csv.bak')})",
                  flush=True)
        os.environ["LARGE_BATCH_PREPARED"] = "1"
    # DeepSpeed JIT-builds its CPU shared-memory allreduce op at init_distributed; in the shared
    # torch_extensions cache, other runs with other build flags make every start rebuild it (~60 s)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions_large_batch"))
    ensure_ranks()

    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset
    from tqdm import tqdm

    import conadv_ds
    from conadv_ds.data import vision as data
    from conadv_ds.evaluation import evaluate
    from conadv_ds.models import Normalize, SmallResNet
    from conadv_ds.perturb import PixelSpace

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    images = data.load(args.dataset, None)

    def pooled(ds, n=None):
        x, y = ds.tensors
        n = len(x) if n is None else min(n, len(x))
        x, y = x[:n], y[:n]
        if x.shape[-1] != args.image_size:
            x = F.adaptive_avg_pool2d(x, args.image_size)
        return TensorDataset(x.contiguous(), y.contiguous())

    train_set, test_set = pooled(images.train, args.train_size), pooled(images.val)
    dist.barrier()
    finished = {key_of(r) for r in read_rows(results)}
    todo = [cell for cell in grid if cell not in finished]
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), disable=not rank0(), desc="study", unit="cell",
               dynamic_ncols=True, mininterval=5)
    aa_train = data.with_autoaugment(data.ImageData("", train_set, test_set, 10, 1, args.image_size, (0.5,),
                                                    (0.5,))).train

    def ce(out_, batch):
        return F.cross_entropy(out_, batch[1], label_smoothing=LABEL_SMOOTHING)

    for method, batch, eps255, seed in todo:
        bar.set_postfix_str(f"{method} b{batch} eps{eps255} s{seed}")
        aa = method == "conadv+aa"
        micro = batch // world
        steps = max(1, round(args.epochs * (len(train_set) // batch)))
        eps = float(eps255) / 255
        cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro, "gradient_clipping": 0.0,
               "steps_per_print": 10 ** 9, "zero_optimization": {"stage": args.zero_stage},
               "optimizer": {"type": "LARS", "params": {"lr": args.base_lr, "momentum": args.momentum,
                                                        "weight_decay": args.weight_decay,
                                                        "trust_coefficient": 0.001}},
               "lr_scaling": {"rule": args.lr_rule, "reference_batch_size": 256},
               "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_ratio": args.warmup,
                                                                   "total_num_steps": steps, "power": args.power}},
               "conadv": {**ATTACK, "epsilon": max(eps, 1e-12), "step_size": max(eps, 1e-12),
                          "seed": 1234 + seed, **METHODS[method]}}
        torch.manual_seed(seed)
        model = torch.nn.Sequential(Normalize(images.mean, images.std), SmallResNet(10, 1, width=args.width))
        engine, *_ = conadv_ds.initialize(model=model, config=cfg, perturb=PixelSpace(parts=2 if aa else 1),
                                          loss_fn=ce if method == "lars+ls" else None)
        # conadv+aa: `micro` distinct images per rank and step, each as a clean and an AutoAugment view
        stream = data.train_stream(aa_train if aa else train_set, micro, rank, world, seed=seed,
                                   collate_fn=data.concat_views if aa else None)
        start, losses = time.time(), []
        for _ in tqdm(range(steps), disable=not rank0(), leave=False, desc="steps", mininterval=10,
                      dynamic_ncols=True):
            m = engine.train_batch(stream)
            losses.append(m.get("clean_loss", m["loss"]))
        seconds = time.time() - start
        test = evaluate(engine.module, data.eval_loader(test_set, 1000, rank, world), epsilon=0.0, steps=0)
        train = evaluate(engine.module, data.eval_loader(train_set, 1000, rank, world), epsilon=0.0, steps=0)
        tail = losses[-max(1, steps // max(1, round(args.epochs))):]  # the last epoch's clean loss
        row = {"method": method, "batch": batch, "eps255": eps255, "seed": seed, "epochs": args.epochs,
               "steps": steps, "train_size": len(train_set), "test_top1": round(test["top1"], 4),
               "train_top1": round(train["top1"], 4), "train_loss": round(sum(tail) / len(tail), 4),
               "seconds": round(seconds, 1), "eval_seconds": round(time.time() - start - seconds, 1)}
        if rank0():
            append_row(results, FIELDS, row)
            bar.write(json.dumps(row))
        bar.update(1)
        del engine, model, stream
    bar.close()
    dist.barrier()
    if rank0():
        report(STUDY, read_rows(results), out, subtitle(read_rows(results)))


def subtitle(rows: list[dict]) -> str:
    first = rows[0] if rows else {"train_size": "?", "epochs": "?"}
    return f"{first['train_size']} training images, {first['epochs']} epochs at every batch"


if __name__ == "__main__":
    main()
