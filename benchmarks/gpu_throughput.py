"""Throughput on one CUDA GPU: ResNet-50 and BERT-base, plain PyTorch, clean, DisAdv and ConAdv.

    python benchmarks/gpu_throughput.py [--warmup 5] [--steps 20] [--micro 128] [--bert_micro 32] [--no-compile]

One process, world size 1, no launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
are set here when unset. A machine without CUDA gets one line and exit status 2.

The data are synthetic and made once on the device, so that no loader is measured. ResNet-50
(`torchvision.models.resnet50(weights=None)`), bf16, micro-batch 128 of 224² images in [0, 1],
the images channels_last; the weights stay contiguous, because DeepSpeed broadcasts each
parameter as a byte view, which a channels_last weight refuses (and ZeRO-1/2 flatten them
anyway), and cuDNN runs a convolution channels_last when its input is. BERT-base
(`BertForMaskedLM(BertConfig())`, nothing downloaded), bf16, micro-batch 32 of 128 tokens, 15% of
them labelled. Each variant is built, runs `--warmup` steps, is timed over `--steps` steps and is
freed before the next one is built; its row is printed as soon as it is measured:

- clean: `conadv_ds.initialize` with conadv off (DeepSpeed bf16, ZeRO-2 by default, SGD with
  momentum: no DeepSpeed op to compile);
- plain: the same ResNet-50 in a hand-written loop keeping what DeepSpeed's bf16 mode keeps:
  bf16 weights, fp32 master weights updated by `torch.optim.SGD` and copied back;
- disadv: the attack with the current weights; conadv τ=1: with the weights of the step before
  (lookahead: the next batch is attacked while they are in place, no copy); conadv τ=2: with
  those of two steps before (a sharded snapshot). The attack is the paper's: L∞, ε = step =
  9/255, one targeted step, clean start 0.2, auxiliary BatchNorm;
- BERT-base clean and conadv τ=1 (word-embedding space, L2, as in ds_configs/bert_demo.json);
- last, as they take longest to start: ResNet-50 clean and conadv τ=1 with the model compiled
  (`torch.compile` of the forward before `initialize`), or "n/a" and the reason where that fails.

Columns: clean images (tokens) per second — a ConAdv step trains on them and on as many
adversarial copies —; that rate over the clean row of the same model; host waits per timed step
(`SyncCounter`: device synchronisations and reads or copies to the host; the note names them per
callable); the peak of allocated memory
(`torch.cuda.max_memory_allocated`, reset before each variant is built).

The FLOP bound. A clean step is a forward and a backward that computes the gradients of the
activations and of the weights: ≈ 3 forward-equivalents. The attack's backward needs input
gradients only (≈ 1, through every layer down to δ), so a ConAdv step — the attack's forward and
input-gradient backward, then forward and backward on the clean and on the adversarial batch —
is ≈ 2 + 6 = 8, i.e. 8/3 of a clean step. At equal efficiency conadv/clean is 3/8 = 0.375: the
goal is a measured ratio ≥ 0.375, and a gap below it is what ConAdv costs beyond its arithmetic
(synchronisations, copies, idle device time). In one process DisAdv does the same work; only the
split schedule takes the attack off the trainer. The last line, from the ResNet-50 rows (conadv:
τ=1 lookahead; clean: through conadv_ds):

    conadv/clean=X disadv/clean=Y
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from harness import free_port

from conadv_ds.syncs import SyncCounter

VISION = "ResNet-50"
BERT = "BERT-base"
CLEAN, PLAIN, DISADV = "clean", "plain PyTorch", "disadv"
CONADV, SNAPSHOT = "conadv τ=1 lookahead", "conadv τ=2 snapshot"
COMPILED = " + torch.compile"
PIXEL_ATTACK = {"epsilon": 9 / 255, "step_size": 9 / 255, "steps": 1, "targeted": True, "clean_start_prob": 0.2,
                "aux_bn": True}
"""The paper's ResNet-50 attack (ds_configs/96k.json)."""
EMBEDDING_ATTACK = {"space": "embedding", "norm": "l2", "epsilon": 1.0, "step_size": 0.5, "steps": 1,
                    "targeted": False, "clean_start_prob": 0.0}
"""The BERT recipe's attack (ds_configs/bert_demo.json)."""
@dataclass
class Row:
    """One variant's line of the table; `rate` None: not measured (`note` says why), else `note`
    names the synchronising calls per step."""

    model: str
    variant: str
    unit: str
    rate: Optional[float] = None
    syncs_per_step: Optional[float] = None
    peak_gib: Optional[float] = None
    note: str = ""


def wait(device: torch.device) -> None:
    """Let the device finish the work queued so far, so that a clock read after it has it all."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device: torch.device) -> None:
    """Free what the previous variant left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    """The most memory allocated on a CUDA device since `fresh`; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def measure(step: Callable[[], object], device: torch.device, warmup: int, steps: int,
            units_per_step: int) -> tuple[float, dict[str, float]]:
    """(units per second, host waits per step by callable) over `steps` calls of
    `step` after `warmup` untimed ones; the device is drained before and after the timed steps,
    outside the count."""
    for _ in range(warmup):
        step()
    wait(device)
    start = time.perf_counter()
    with SyncCounter(device) as syncs:
        for _ in range(steps):
            step()
    wait(device)
    return units_per_step * steps / (time.perf_counter() - start), {k: n / steps for k, n in syncs.calls.items()}


Built = tuple[Callable[[], object], Callable[[], None]]
"""A variant ready to run: its training step, and what frees it (a DeepSpeed engine stays
referenced, with its weights and optimizer state, until destroyed)."""


def run_variant(model: str, variant: str, unit: str, build: Callable[[], Built], device: torch.device,
                opts: argparse.Namespace, units_per_step: int, optional: bool = False) -> Row:
    """Build a variant, time it and free it. With `optional` a failure is a row "n/a" with the
    reason instead of an exception."""
    fresh(device)
    release: Optional[Callable[[], None]] = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # initialize() prints its config per variant
            step, release = build()
        rate, syncs = measure(step, device, opts.warmup, opts.steps, units_per_step)
        peak = peak_gib(device)
    except Exception as e:
        if not optional:
            raise
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return Row(model, variant, unit, note=f"n/a: {reason[:160]}")
    finally:
        if release is not None:
            release()
    note = ", ".join(f"{name} {n:g}" for name, n in sorted(syncs.items()))
    return Row(model, variant, unit, rate, sum(syncs.values()), peak, note)


def ds_config(micro: int, conadv: dict, stage: int) -> dict:
    """DeepSpeed bf16 at one micro-batch per step (BatchNorm in fp32: `bn.fp32_batchnorm`)."""
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "steps_per_print": 10 ** 9, "bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True,
           "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}, "conadv": conadv}


def image_batches(micro: int, size: int, classes: int, device: torch.device, n: int = 2) -> list:
    """`n` (images, labels) micro-batches on `device`: bf16 channels_last images in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(micro, 3, size, size, generator=g).to(device, torch.bfloat16)
             .contiguous(memory_format=torch.channels_last),
             torch.randint(0, classes, (micro,), generator=g).to(device)) for _ in range(n)]


def token_batches(micro: int, seq: int, vocab: int, device: torch.device, n: int = 2) -> list:
    """`n` masked-LM micro-batches on `device`: random tokens, 15% of the positions labelled."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        labels = torch.where(torch.rand(micro, seq, generator=g) < 0.15, ids, -100)
        out.append({k: v.to(device) for k, v in
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()})
    return out


def plain_step(make_model: Callable[[], torch.nn.Module], batches: list, device: torch.device,
               lr: float = 0.01) -> Built:
    """A hand-written bf16 training step: bf16 weights (BatchNorm computed in fp32, as in the
    engine's rows), gradients copied into fp32 master weights, torch.optim.SGD on those, the
    result copied back into the bf16 weights."""
    from conadv_ds.bn import fp32_batchnorm

    model = fp32_batchnorm(make_model().to(device=device, dtype=torch.bfloat16))
    params = list(model.parameters())
    master = [p.detach().float() for p in params]
    opt = torch.optim.SGD(master, lr=lr, momentum=0.9)
    data = itertools.cycle(batches)

    def step() -> torch.Tensor:
        x, y = next(data)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for m, p in zip(master, params):
            m.grad, p.grad = p.grad.float(), None
        opt.step()
        with torch.no_grad():
            for m, p in zip(master, params):
                p.copy_(m)
        return loss

    return step, lambda: None


def engine_step(make_model: Callable[[], torch.nn.Module], conadv: dict, batches: list, micro: int, stage: int,
                compiled: bool = False) -> Built:
    """`engine.train_batch` of `conadv_ds.initialize` on the model, fed from one iterator."""
    import conadv_ds
    from conadv_ds.bn import fp32_batchnorm

    model = fp32_batchnorm(make_model())
    if compiled:  # the forward alone, as the vision recipe's --compile: DeepSpeed's hooks stay eager
        model.forward = torch.compile(model.forward)
    engine, *_ = conadv_ds.initialize(model=model, config=ds_config(micro, conadv, stage))
    data = itertools.cycle(batches)
    return (lambda: engine.train_batch(data)), engine.destroy


def benchmark(device: torch.device, opts: argparse.Namespace, vision_model: Callable[[], torch.nn.Module],
              bert_model: Callable[[], torch.nn.Module]) -> Iterator[Row]:
    """The rows of the table, each yielded once measured, one variant at a time on `device` (the
    CPU too, for a check of the logic with small models and sizes; DeepSpeed places its engines
    on its own accelerator); the compiled ones come last, as they take longest to start.
    `bert_model()` must have `opts.vocab_size` tokens."""
    images = image_batches(opts.micro, opts.image_size, opts.classes, device)
    tokens = token_batches(opts.bert_micro, opts.seq_len, opts.vocab_size, device)
    clean = {"enabled": False}
    vision = {CLEAN: clean, DISADV: {"schedule": "disadv", **PIXEL_ATTACK},
              CONADV: {"schedule": "conadv", "staleness": 1, **PIXEL_ATTACK},
              SNAPSHOT: {"schedule": "conadv", "staleness": 2, **PIXEL_ATTACK}}
    bert = {CLEAN: clean, CONADV: {"schedule": "conadv", "staleness": 1, **EMBEDDING_ATTACK}}

    def vision_engine(block: dict, compiled: bool = False) -> Callable[[], Built]:
        return lambda: engine_step(vision_model, block, images, opts.micro, opts.zero_stage, compiled)

    yield run_variant(VISION, CLEAN, "images/s", vision_engine(clean), device, opts, opts.micro)
    yield run_variant(VISION, PLAIN, "images/s", lambda: plain_step(vision_model, images, device), device, opts,
                      opts.micro)
    for name in (DISADV, CONADV, SNAPSHOT):
        yield run_variant(VISION, name, "images/s", vision_engine(vision[name]), device, opts, opts.micro)
    for name, block in bert.items():
        yield run_variant(BERT, name, "tokens/s", lambda b=block: engine_step(
            bert_model, b, tokens, opts.bert_micro, opts.zero_stage), device, opts, opts.bert_micro * opts.seq_len)
    for name in (CLEAN, CONADV):
        if opts.compile:
            yield run_variant(VISION, name + COMPILED, "images/s", vision_engine(vision[name], compiled=True), device,
                              opts, opts.micro, optional=True)
        else:
            yield Row(VISION, name + COMPILED, "images/s", note="n/a: --no-compile")


HEADER = ("| model | variant | rate | vs clean | host waits/step | peak GiB | note |\n"
          "|---|---|---:|---:|---:|---:|---|")


def format_row(row: Row, measured: list[Row]) -> str:
    """`row` as a line of the Markdown table under `HEADER`; "vs clean" divides its rate by that
    of the clean row of the same model among `measured`."""
    clean = next((r.rate for r in measured if r.model == row.model and r.variant == CLEAN), None)
    if row.rate is None:
        cells = ["n/a", "", "", ""]
    else:
        cells = [f"{row.rate:,.0f} {row.unit}", f"{row.rate / clean:.3f}" if clean else "",
                 f"{row.syncs_per_step:g}", "" if row.peak_gib is None else f"{row.peak_gib:.2f}"]
    return "| " + " | ".join([row.model, row.variant, *cells, row.note]) + " |"


def ratio_line(rows: list[Row], model: str = VISION) -> str:
    """conadv/clean and disadv/clean of `model`'s rates (conadv: lookahead τ = 1)."""
    rate = {r.variant: r.rate for r in rows if r.model == model}
    clean = rate[CLEAN]
    return f"conadv/clean={rate[CONADV] / clean:.3f} disadv/clean={rate[DISADV] / clean:.3f}"


def single_rank_env() -> None:
    """The environment of a one-process torch.distributed world, where no launcher set one."""
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def resnet50() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None)


def bert_base(vocab_size: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=vocab_size))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--micro", type=int, default=128, help="ResNet-50 images per step")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--bert_micro", type=int, default=32, help="BERT sequences per step")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--vocab_size", type=int, default=30522, help="BERT-base's WordPiece vocabulary")
    p.add_argument("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time clean and conadv with the forward compiled")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    opts = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_throughput: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    single_rank_env()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # one table: not DeepSpeed's set-up report per variant
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16, ZeRO-{opts.zero_stage}, "
          f"world size 1; ResNet-50 {opts.image_size}px channels_last micro-batch {opts.micro}, BERT-base sequence "
          f"{opts.seq_len} micro-batch {opts.bert_micro}; {opts.warmup} warm-up + {opts.steps} timed steps per variant")
    print(HEADER, flush=True)
    rows: list[Row] = []
    for row in benchmark(device, opts, resnet50, lambda: bert_base(opts.vocab_size)):
        rows.append(row)
        print(format_row(row, rows), flush=True)
    print(ratio_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
