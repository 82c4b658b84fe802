"""ResNet on ImageNet with ConAdv, as in the paper — or on a small embedded real data set.

    deepspeed recipes/resnet_imagenet.py --deepspeed_config ds_configs/96k.json --data_dir /data/imagenet
    deepspeed --num_gpus 2 recipes/resnet_imagenet.py --deepspeed_config ds_configs/demo.json   # CPU demo
    python recipes/resnet_imagenet.py --deepspeed_config ds_configs/96k.json --dry_run --world_size 512

Besides DeepSpeed's keys and the `conadv` block, the JSON may carry a `recipe` block (dataset,
model, epochs, label smoothing, image size, evaluation attack); flags override it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from conadv_ds.cli import count, one_line_errors, parse_overrides, positive, run_launched
from conadv_ds.config import JsonBlock, half_precision, load_json, validate_block
from conadv_ds.data.vision import IMAGENET_TRAIN_SIZE
from conadv_ds.errors import ConfigError
from conadv_ds.resolve import RunConfig, resolve_config

DEMO = "deepspeed --num_gpus 2 recipes/resnet_imagenet.py --deepspeed_config ds_configs/demo.json"


class RecipeConfig(JsonBlock):
    """The `recipe` block of the JSON: what the training script does around the engine."""

    dataset: Literal["digits", "fashion-mnist", "imagenet"] = "digits"
    model: str = "small_resnet"
    epochs: float = 10
    label_smoothing: float = 0.0
    image_size: int = 224
    autoaugment: bool = False
    eval_epsilon: float = 4 / 255
    eval_steps: int = 3
    eval_batch_size: int = 256
    eval_interval: Optional[int] = None
    """Evaluate (clean + PGD) every N optimizer steps; None: once per epoch; 0: only at the end."""
    strict_data: bool = False
    """Stop at the first unreadable image (naming it) instead of counting and skipping it."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with conadv and recipe blocks")
    p.add_argument("--data_dir", help="ImageNet layout: train/ and val/ with one folder per class")
    p.add_argument("--dataset", choices=["digits", "fashion-mnist", "imagenet"])
    p.add_argument("--model", help="small_resnet, or any torchvision / timm classifier name")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max_steps", type=count)
    p.add_argument("--output_dir", default="runs/resnet")
    p.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry_run", action="store_true", help="print the plan for --world_size and exit")
    p.add_argument("--world_size", type=int, help="world size for --dry_run")
    p.add_argument("--autoaugment", action="store_true", default=None, help="ConAdv + AutoAugment batches")
    p.add_argument("--conadv", action="append", default=[], metavar="KEY=VALUE",
                   help="override a conadv field, e.g. --conadv epsilon=0.05 (JSON values)")
    p.add_argument("--strict_data", action="store_true", default=None,
                   help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--eval_epsilon", type=float)
    p.add_argument("--eval_steps", type=count)
    p.add_argument("--eval_interval", type=count, help="evaluate every N steps (default: each epoch; 0: at the end)")
    p.add_argument("--log_interval", type=positive, default=10)
    p.add_argument("--save_interval", type=count, default=0, help="checkpoint every N steps (0: per epoch only)")
    p.add_argument("--save_total_limit", type=count, default=3,
                   help="keep the newest N checkpoints in output_dir (0: keep all); the latest is never deleted")
    p.add_argument("--num_workers", type=count,
                   help="DataLoader workers per rank (default: none for the embedded in-memory sets, else this "
                        "process's CPUs shared among the node's ranks, up to 8); pinned memory on accelerators")
    p.add_argument("--channels_last", action="store_true",
                   help="images in NHWC memory format: cuDNN then runs NHWC (tensor-core) convolutions; the weights "
                        "stay NCHW, as DeepSpeed keeps them in flat buffers")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the model's forward, which the attack runs too (default backend inductor); "
                        "DeepSpeed's engine.compile() would also trace its forward hook, whose guard on the "
                        "micro-step counter recompiles at every micro-batch")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """Everything `train` needs that is known before any data or model is loaded."""

    config: dict
    """The JSON without the recipe block: what `conadv_ds.initialize` gets."""
    run: RunConfig
    recipe: RecipeConfig


def make_plan(args: argparse.Namespace, launch_size: Optional[int] = None) -> Plan:
    """Config, recipe settings, overrides and batch plan: every check that needs no data or model."""
    raw = load_json(args.deepspeed_config)
    recipe = validate_block(RecipeConfig, raw.pop("recipe", {}), "recipe")
    for key in ("dataset", "model", "epochs", "autoaugment", "eval_epsilon", "eval_steps", "eval_interval",
                "strict_data"):
        if getattr(args, key) is not None:
            recipe = recipe.model_copy(update={key: getattr(args, key)})
    if args.data_dir and args.dataset is None:
        recipe = recipe.model_copy(update={"dataset": "imagenet"})
    # the official AutoAugment batch: clean, AutoAugment and adversarial copies, a third each
    defaults = {"adv_weight": 1 / 3} if recipe.autoaugment else None
    run = resolve_config(raw, parse_overrides(args.conadv), launch_size, defaults=defaults)
    if recipe.dataset == "imagenet" and not args.data_dir and not args.dry_run:
        raise ConfigError(f"{args.deepspeed_config}: dataset 'imagenet' needs --data_dir /path/to/imagenet "
                          f"(train/ and val/ class folders). Demo on the embedded data: {DEMO}; "
                          f"plan only: add --dry_run --world_size N")
    return Plan(raw, run, recipe)


def schedule_points(run: RunConfig, total_steps: int) -> list[tuple[int, float]]:
    """The learning rate at key steps, read from a scheduler built on a throwaway optimizer."""
    import torch

    from conadv_ds import optim

    lr = (run.optimizer or run.ds.get("optimizer", {})).get("params", {}).get("lr", 0.0)
    if run.scheduler is None:
        return [(0, lr)]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = optim.build_scheduler(run.scheduler, opt)
    marks = sorted({0, 1, total_steps // 20, total_steps // 4, total_steps // 2, 3 * total_steps // 4,
                    total_steps - 1} | {int(run.scheduler.get("params", {}).get("warmup_num_steps", 0))})
    points, step = [], 0
    for mark in marks:
        while step < mark:
            opt.step()
            sched.step()
            step += 1
        points.append((mark, opt.param_groups[0]["lr"]))
    return points


def memory_plan(n_params: int, world: int, half: bool, optimizer_states: int) -> dict[int, float]:
    """Bytes per rank for weights + gradients + optimizer (fp32 master + states), per ZeRO stage."""
    w = 2 if half else 4
    master = 4 if half else 0
    full = {"params": n_params * w, "grads": n_params * w, "optim": n_params * (master + 4 * optimizer_states)}
    return {0: sum(full.values()),
            1: full["params"] + full["grads"] + full["optim"] / world,
            2: full["params"] + (full["grads"] + full["optim"]) / world,
            3: sum(full.values()) / world}


def dry_run(args: argparse.Namespace) -> None:
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    plan = make_plan(args, world)
    run, recipe = plan.run, plan.recipe
    tb, micro, gas, world = (run.batch.train_batch_size, run.batch.micro_batch_per_rank,
                             run.batch.gradient_accumulation_steps, run.batch.world_size)
    if run.layout:
        print(f"split: launch ranks {list(run.layout.attackers)} attack, {world} ranks train")
    n_train = {"imagenet": IMAGENET_TRAIN_SIZE, "digits": 1437, "fashion-mnist": 60000}[recipe.dataset]
    check_batch(tb, n_train, recipe.dataset, args.deepspeed_config)
    steps_per_epoch = n_train // tb
    total = total_steps(run, recipe, steps_per_epoch, args.max_steps)
    from conadv_ds.models import build_classifier

    classes, chans = (1000, 3) if recipe.dataset == "imagenet" else (10, 1)
    n_params = sum(p.numel() for p in build_classifier(recipe.model, classes, chans, (0.5,) * chans,
                                                       (0.5,) * chans).parameters())
    half = half_precision(run.ds) is not None
    opt_type = str((run.optimizer or run.ds.get("optimizer", {})).get("type", "")).lower()
    states = 2 if opt_type in ("adam", "adamw", "lamb") else 1
    conadv = run.conadv
    print(f"plan for {args.deepspeed_config} on {world} ranks:")
    print(f"  train_batch_size {tb} = micro-batch {micro} × gradient accumulation {gas} × world size {world}")
    print(f"  dataset {recipe.dataset} ({n_train} training images): {steps_per_epoch} steps/epoch, "
          f"{total} steps = {total / steps_per_epoch:.1f} epochs")
    print("  learning rate: " + ", ".join(f"step {s}: {lr:.4g}" for s, lr in schedule_points(run, total)))
    every = {None: "each epoch", 0: "at the end"}.get(recipe.eval_interval, f"every {recipe.eval_interval} steps")
    print(f"  evaluation (clean + {recipe.eval_steps}-step PGD): {every}")
    print(f"  conadv: schedule {conadv.schedule if conadv.enabled else 'off'}, τ={conadv.staleness}, "
          f"ε={conadv.epsilon:.4f}, steps={conadv.steps}, aux_bn={conadv.aux_bn}")
    mem = memory_plan(n_params, world, half, states)
    print(f"  model {recipe.model}: {n_params / 1e6:.1f}M parameters; weights+grads+optimizer per rank: "
          + ", ".join(f"ZeRO-{s} {b / 2**20:.1f} MiB" for s, b in mem.items()))


def total_steps(run: RunConfig, recipe: RecipeConfig, steps_per_epoch: int, max_steps: Optional[int]) -> int:
    """--max_steps, else the scheduler's total_num_steps, else the recipe's epochs."""
    if max_steps:
        return max_steps
    scheduled = (run.scheduler or run.ds.get("scheduler", {})).get("params", {}).get("total_num_steps")
    return int(scheduled) if scheduled else max(1, round(recipe.epochs * steps_per_epoch))


def check_batch(tb: int, n_train: int, dataset: str, config: str) -> None:
    if tb > n_train:
        raise ConfigError(f"train_batch_size={tb} ({config}) is larger than the {dataset} training set ({n_train} "
                          f"images); point --data_dir at ImageNet, or run the demo: {DEMO}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    train(args, make_plan(args))


def train(args: argparse.Namespace, plan: Plan) -> None:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    import conadv_ds
    from conadv_ds.bn import fp32_batchnorm
    from conadv_ds.data import vision as data
    from conadv_ds.evaluation import evaluate
    from conadv_ds.fingerprint import weights_sha256
    from conadv_ds.models import build_classifier
    from conadv_ds.perturb import PixelSpace

    recipe, batch = plan.recipe, plan.run.batch
    tb, micro, world = batch.train_batch_size, batch.micro_batch_per_rank, batch.world_size
    images = data.load(recipe.dataset, args.data_dir, recipe.autoaugment, recipe.image_size, recipe.strict_data)
    check_batch(tb, len(images.train), images.name, args.deepspeed_config)
    torch.manual_seed(args.seed)
    model = build_classifier(recipe.model, images.num_classes, images.channels, images.mean, images.std)
    if half_precision(plan.run.ds) and "buffer_dtype" not in plan.run.ds.get("data_types", {}):
        fp32_batchnorm(model)  # as the official code: BatchNorm and its statistics in fp32
    if args.compile:  # the model's forward alone: DeepSpeed's forward hooks stay eager (see --compile)
        model.forward = torch.compile(model.forward, backend=args.compile)

    def loss_fn(logits, batch):
        return F.cross_entropy(logits.float(), batch[1], label_smoothing=recipe.label_smoothing)

    engine, _, _, _ = conadv_ds.initialize(model=model, config=plan.run, loss_fn=loss_fn,
                                           perturb=PixelSpace(parts=2 if recipe.autoaugment else 1))
    if engine.is_attacker:  # schedule 'split': serve the trainers' steps until they stop
        with contextlib.suppress(StopIteration):
            while True:
                engine.train_batch()
        return
    rank, out = engine.global_rank, Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "effective_config.json").write_text(json.dumps({**plan.config, "conadv": engine.conadv.model_dump(),
                                                               "recipe": recipe.model_dump()}, indent=2))
    steps_per_epoch = len(images.train) // tb
    total = total_steps(plan.run, recipe, steps_per_epoch, args.max_steps)
    if (args.resume or args.eval_only) and (out / "latest").is_file():
        engine.load_checkpoint(str(out))
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else None
    loading = data.LoaderOptions.for_rank(images.train, engine.device, args.num_workers)
    val = data.eval_loader(images.val, recipe.eval_batch_size, rank, world, loading)

    def run_eval(tag: str) -> dict:
        res = evaluate(engine.module, val, recipe.eval_epsilon, recipe.eval_steps, device=engine.device, dtype=dtype)
        if rank == 0:
            print(f"eval {tag}: top1 {res['top1']:.4f} top5 {res['top5']:.4f} robust_top1 {res['robust_top1']:.4f} "
                  f"(PGD ε={recipe.eval_epsilon:.4f}, {recipe.eval_steps} steps, {int(res['n'])} images)", flush=True)
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": engine.global_steps, **res}) + "\n")
        return res

    def save() -> None:
        engine.save_checkpoint(str(out), save_total_limit=args.save_total_limit or None)

    if args.eval_only:
        engine.stop_attackers()
        run_eval("only")
        return
    # with autoaugment each of the `micro` images comes with its AutoAugment view (and, attacked,
    # its adversarial copy): train_batch_size counts distinct images, as in the official batch
    collate = data.concat_views if recipe.autoaugment else None
    if args.channels_last:
        collate = data.channels_last(collate)
    stream = data.train_stream(images.train, micro, rank, world, args.seed, loading, collate_fn=collate)
    stream = itertools.islice(stream, engine.micro_batches_pulled, None)
    bar = tqdm(total=total, initial=engine.global_steps, disable=rank != 0, desc="train", dynamic_ncols=True)
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None
    start = time.time()
    while engine.global_steps < total:
        m = engine.train_batch(stream)
        step = engine.global_steps
        bar.update(1)
        if rank == 0:
            log.write(json.dumps(m) + "\n")
            if engine.monitor.enabled:
                engine.monitor.write_events([(f"Train/{k}", v, engine.global_samples) for k, v in m.items()])
            if step % args.log_interval == 0 or step == total:
                parts = " ".join(f"{k} {m[k]:.4f}" for k in ("loss", "clean_loss", "adv_loss", "accuracy",
                                                            "adv_accuracy") if k in m)
                bar.write(f"step {step}/{total} {parts} lr {m['lr']:.4g} samples/s {m['samples_per_sec']:.0f}")
        epoch_end = step % steps_per_epoch == 0 and step < total
        if epoch_end and recipe.eval_interval is None:
            run_eval(f"epoch {step // steps_per_epoch}")
        if epoch_end or (args.save_interval and step % args.save_interval == 0 and step < total):
            save()
        if recipe.eval_interval and step % recipe.eval_interval == 0 and step < total:
            run_eval(f"step {step}")
    bar.close()
    engine.stop_attackers()
    save()
    run_eval("final")
    sha = weights_sha256(engine.module)
    if rank == 0:
        log.close()
        plot_curves(out)
        print(f"trained {total} steps in {time.time() - start:.0f} s; checkpoint {out}/latest; "
              f"curves {out}/curves.png", flush=True)
        skipped = len(getattr(images.train, "skipped", ())) + len(getattr(images.val, "skipped", ()))
        if skipped:
            print(f"skipped {skipped} unreadable images on rank 0 (named in the warnings above)", flush=True)
        print(f"weights_sha256={sha}", flush=True)


def plot_curves(out: Path) -> None:
    """Loss, accuracy and learning rate against step, from metrics.jsonl (and eval.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()] \
        if (out / "eval.jsonl").is_file() else []
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in ("loss", "clean_loss", "adv_loss"):
        if key in rows[0]:
            ax[0].plot(steps, [r[key] for r in rows], label=key)
    for key in ("accuracy", "adv_accuracy"):
        if key in rows[0]:
            ax[1].plot(steps, [r[key] for r in rows], label=f"train {key}", alpha=0.6)
    if evals:
        ax[1].plot([e["step"] for e in evals], [e["top1"] for e in evals], "o-", label="eval top1")
        ax[1].plot([e["step"] for e in evals], [e["robust_top1"] for e in evals], "s-", label="eval robust top1")
    ax[2].plot(steps, [r["lr"] for r in rows])
    for a, title in zip(ax, ("loss", "accuracy", "learning rate")):
        a.set_title(title)
        a.set_xlabel("step")
        if title != "learning rate":
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run_launched(one_line_errors(main))
