"""The masked-LM large-batch study: a small BERT pretrained with LAMB on Python's documentation at a
small batch and at 8× and 32× larger ones, and how much of the large batches' held-out gap each
method closes.

Python's full documentation (Debian's python3.11-doc, prose paragraphs of the reST sources) split by
document: every tenth document is held out. A deterministic WordPiece vocabulary is built from the
training documents, texts are packed into fixed-length blocks (transformers' run_mlm.py packing), and
a fixed number of training blocks is trained on for the same number of epochs at every batch, LAMB
with linear warmup and linear decay, the learning rate scaled from the smallest batch by the
square-root rule, ZeRO-2 on 2 CPU ranks. Every cell starts from one warm start (`--warm_steps` LAMB
steps at the smallest batch): from the initialisation a small BERT first sits on the
most-frequent-token plateau, and how soon a run leaves it decides more than the batch does.

Methods (every one is LAMB underneath): `lamb`; `disadv` (attack with the current weights);
`conadv` (the attack made with the weights of the previous step, τ = 1). The attack perturbs the
word-embedding output: L2, ε per element (`epsilon_scale: per_element`: the ball's radius is
ε·√(L·d)), a FreeLB random start, one untargeted ascent step of the MLM loss, λ = 0.5. ConAdv also
runs an ε sweep at the largest batch (`--sweep_seeds`).

Every (method, batch, ε, seed) cell evaluates masked-token accuracy and MLM loss on a fixed set of
masked positions of held-out blocks and of training blocks (eval mode), so the train − held-out
gap is measured on the same footing. Rows go to `<output_dir>/results.csv` as they finish; a rerun
skips the cells already there. `results.md`, `summary.json` and `accuracy_vs_batch.png` are written
at the end (or with `--report_only`); `study.json` holds the settings and the most-frequent-token
baseline. The warm start is kept in `warm_start/`, the seed-0 models under `models/`
(`save_pretrained`, with the tokenizer).

    sudo bash scripts/setup_debian.sh                                      # python3.11-doc
    python benchmarks/bert_large_batch.py --output_dir runs/bert_large_batch    # ~75 min on 2 cores
    python benchmarks/bert_large_batch.py --quick --output_dir /tmp/q      # embedded help topics, < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

from harness import ensure_ranks, rank0
from study_report import Study, append_row, check_settings, read_rows, report

METHODS = {
    "lamb": {"enabled": False},
    "disadv": {"schedule": "disadv"},
    "conadv": {"schedule": "conadv", "staleness": 1},
}
ADVERSARIAL = ("disadv", "conadv")
ATTACK = {"space": "embedding", "norm": "l2", "epsilon_scale": "per_element", "steps": 1, "targeted": False,
          "clean_start_prob": 0.0, "adv_weight": 0.5}
KEY = ("method", "batch", "eps", "seed")
FIELDS = [*KEY, "epochs", "steps", "train_blocks", "heldout_acc", "heldout_loss", "train_acc", "train_loss",
          "last_epoch_loss", "seconds", "eval_seconds"]
SETTINGS = ("corpus", "train_blocks", "eval_blocks", "seq_len", "vocab_size", "model", "epochs", "base_lr",
            "lr_rule", "weight_decay", "warmup", "dropout", "zero_stage", "warm_steps")
STUDY = Study(reference="lamb", methods=tuple(METHODS), adversarial=ADVERSARIAL, eps_label="ε (per element)",
              test="heldout_acc", train="train_acc", metric="masked-token accuracy", test_name="held-out",
              unit="blocks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/bert_large_batch")
    p.add_argument("--batches", default="16,128,512", help="global batch sizes (sequences); the smallest is the reference")
    p.add_argument("--method_batches", default="128,512", help="the batches every method runs at ('all': every batch)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reference_methods", default="lamb", help="methods run at the batches outside --method_batches")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eps", type=float, default=0.001, help="ε (= step) per element of the word-embedding output")
    p.add_argument("--eps_sweep", default="0.0003,0.003", help="extra ConAdv ε at the largest batch")
    p.add_argument("--sweep_seeds", default="0,1", help="the seeds the ε sweep runs")
    p.add_argument("--epochs", type=float, default=16)
    p.add_argument("--corpus", default="python-docs", choices=["python-docs", "help-topics"])
    p.add_argument("--train_blocks", type=int, default=2048, help="training blocks (sequences) taken from the corpus")
    p.add_argument("--eval_blocks", type=int, default=512, help="held-out (and training) blocks evaluated")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--model", default="64,2,2,256", help="hidden, layers, heads, intermediate")
    p.add_argument("--base_lr", type=float, default=1e-2, help="LAMB lr at the smallest batch")
    p.add_argument("--lr_rule", default="sqrt", choices=["sqrt", "linear"])
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup fraction of the steps")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--warm_steps", type=int, default=800,
                   help="every cell starts from one model trained this many LAMB steps at the smallest batch "
                        "(past the most-frequent-token plateau); 0: from the initialisation")
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--report_only", action="store_true", help="write the report from the CSV, train nothing")
    p.add_argument("--quick", action="store_true", help="tiny grid on the embedded help topics, for smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.corpus, args.batches, args.method_batches, args.epochs = "help-topics", "8,32", "32", 1
        args.train_blocks, args.eval_blocks, args.seq_len, args.vocab_size = 256, 32, 64, 1000
        args.model, args.seeds, args.eps_sweep, args.warm_steps = "32,1,2,64", "0,1", "0.03", 4
        args.sweep_seeds = "0,1"
    return args


def fmt_eps(v) -> str:
    return f"{float(v):g}"


def build_grid(args) -> list[tuple[str, int, str, int]]:
    """Cells as (method, batch, ε, seed): the main cells seed-major, so that a partial study covers
    every cell of the first seeds, then the ε sweep at the largest batch, seed-major too."""
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    batches = sorted(int(b) for b in args.batches.split(","))
    full = batches if args.method_batches == "all" else [int(b) for b in args.method_batches.split(",")]
    at_ref = args.reference_methods.split(",")
    sweep = [fmt_eps(e) for e in args.eps_sweep.split(",") if e and fmt_eps(e) != fmt_eps(args.eps)]
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = [(m, b, fmt_eps(args.eps) if m in ADVERSARIAL else "0", seed) for seed in seeds for b in batches
            for m in methods if b in full or m in at_ref]
    if "conadv" in methods:
        grid += [("conadv", max(batches), e, int(seed)) for seed in args.sweep_seeds.split(",") for e in sweep]
    return grid


def key_of(row: dict) -> tuple[str, int, str, int]:
    return row["method"], int(row["batch"]), fmt_eps(row["eps"]), int(row["seed"])


def corpus(args) -> tuple[list[str], list[str]]:
    """(training paragraphs, held-out paragraphs): whole documents apart (every tenth held out)."""
    from conadv_ds.data import text

    train, held = text.split_documents(text.help_topics() if args.corpus == "help-topics" else text.python_docs())
    return [p for d in train for p in d.paragraphs], [p for d in held for p in d.paragraphs]


def prepare(args, out: Path) -> dict:
    """Tokenizer, packed training / held-out blocks and the fixed evaluation masks (every rank
    computes the same: the tokenizer is deterministic, the block choice seeded)."""
    import datasets
    import torch

    from conadv_ds.data import text

    datasets.disable_progress_bars()
    train_texts, held_texts = corpus(args)
    tok_dir = out / "tokenizer"
    tokenizer = text.train_tokenizer(train_texts, args.vocab_size, tok_dir if rank0() else None)

    def blocks(texts):
        ds = datasets.Dataset.from_dict({"text": texts})
        return text.tokenize_and_group(ds, tokenizer, args.seq_len)

    train_all, held_all = blocks(train_texts), blocks(held_texts)
    g = torch.Generator().manual_seed(0)
    if len(train_all) < args.train_blocks or len(held_all) < args.eval_blocks:
        raise SystemExit(f"{args.corpus}: {len(train_all)} training and {len(held_all)} held-out blocks of "
                         f"{args.seq_len} tokens; --train_blocks {args.train_blocks} / --eval_blocks "
                         f"{args.eval_blocks} ask for more")
    train = train_all.select(sorted(torch.randperm(len(train_all), generator=g)[:args.train_blocks].tolist()))
    held = held_all.select(sorted(torch.randperm(len(held_all), generator=g)[:args.eval_blocks].tolist()))
    collate = text.MaskedLM(tokenizer)
    held_masked = text.masked_batches(held, 32, collate, seed=1)
    train_masked = text.masked_batches(train.select(range(args.eval_blocks)), 32, collate, seed=2)
    counts = torch.bincount(torch.tensor(train["input_ids"]).flatten(), minlength=len(tokenizer))
    counts[tokenizer.all_special_ids] = 0
    top = int(counts.argmax())
    labels = torch.cat([b["labels"].flatten() for b in held_masked])
    labels = labels[labels != -100]
    return {"tokenizer": tokenizer, "train": train, "collate": collate, "held": held_masked, "train_eval": train_masked,
            "baseline": {"token": tokenizer.convert_ids_to_tokens(top), "heldout_acc": float((labels == top).float().mean()),
                         "train_blocks_available": len(train_all), "heldout_blocks_available": len(held_all),
                         "heldout_masked_positions": int(labels.numel())}}


def record_baseline(out: Path, baseline: dict) -> None:
    path = out / "study.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "baseline": baseline}, indent=1) + "\n")


def evaluate(module, batches, rank: int, world: int) -> tuple[float, float]:
    """(masked-token accuracy, MLM loss per masked token) over `batches`, each rank taking every
    world-th batch, summed over ranks."""
    import torch
    import torch.distributed as dist

    from conadv_ds import batch as B

    was = module.training
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for b in batches[rank::world]:
            out = module(**b)
            correct, counted = B.correct(out, b)
            sums += torch.stack([correct.double(), counted.double(), out.loss.double() * counted])
    module.train(was)
    dist.all_reduce(sums)
    correct, counted, loss = sums.tolist()
    return correct / counted, loss / counted


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    results = out / "results.csv"
    if args.report_only:
        report(STUDY, read_rows(results), out, subtitle=subtitle(json.loads((out / "study.json").read_text())))
        return
    grid = build_grid(args)
    if "LOCAL_RANK" not in os.environ:
        check_settings(out, {k: getattr(args, k) for k in SETTINGS})  # before any rank starts
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions_large_batch"))
    ensure_ranks()

    import deepspeed
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import BertConfig, BertForMaskedLM

    import conadv_ds
    from conadv_ds.data import text

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(args, out)
    if rank0():
        record_baseline(out, data["baseline"])
        print(json.dumps(data["baseline"]), flush=True)
    dist.barrier()
    finished = {key_of(r) for r in read_rows(results)}
    todo = [cell for cell in grid if cell not in finished]
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), disable=not rank0(), desc="study", unit="cell",
               dynamic_ncols=True, mininterval=5)
    hidden, layers, heads, inter = (int(v) for v in args.model.split(","))
    smallest = min(int(b) for b in args.batches.split(","))
    def train_cell(method: str, batch: int, eps: str, seed: int, steps: int, init: Optional[dict]):
        """One run of `steps` LAMB steps at `batch` from `init` (a state dict) or the seed's
        initialisation: (engine, per-step clean losses, seconds)."""
        micro = batch // world
        cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0,
               "steps_per_print": 10 ** 9, "zero_optimization": {"stage": args.zero_stage},
               "optimizer": {"type": "LAMB", "params": {"lr": args.base_lr, "weight_decay": args.weight_decay,
                                                        "betas": [0.9, 0.999], "eps": 1e-6}},
               "lr_scaling": {"rule": args.lr_rule, "reference_batch_size": smallest},
               "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_ratio": args.warmup,
                                                                   "total_num_steps": steps, "power": 1.0}},
               "conadv": {**ATTACK, "epsilon": max(float(eps), 1e-12), "step_size": max(float(eps), 1e-12),
                          "seed": 1234 + seed, **METHODS[method]}}
        torch.manual_seed(seed)
        model = BertForMaskedLM(BertConfig(vocab_size=len(data["tokenizer"]), hidden_size=hidden,
                                           num_hidden_layers=layers, num_attention_heads=heads,
                                           intermediate_size=inter, max_position_embeddings=args.seq_len,
                                           hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout))
        if init is not None:
            model.load_state_dict(init)
        engine, *_ = conadv_ds.initialize(model=model, config=cfg)
        stream = text.MLMStream([(data["train"], data["collate"], 0)], micro, rank, world, seed)
        start, losses = time.time(), []
        for _ in tqdm(range(steps), disable=not rank0(), leave=False, desc="steps", mininterval=10,
                      dynamic_ncols=True):
            m = engine.train_batch(stream)
            losses.append(m.get("clean_loss", m["loss"]))
        return engine, losses, time.time() - start

    warm = None
    if args.warm_steps and todo:
        path = out / "warm_start"
        if not (path / "config.json").is_file():
            engine, _, seconds = train_cell("lamb", smallest, "0", 1000, args.warm_steps, None)
            acc, _ = evaluate(engine.module, data["held"], rank, world)
            if rank0():
                engine.module.save_pretrained(str(path))
                print(json.dumps({"warm_start_steps": args.warm_steps, "batch": smallest, "seconds": round(seconds, 1),
                                  "heldout_acc": round(acc, 4)}), flush=True)
            del engine
        dist.barrier()
        warm = BertForMaskedLM.from_pretrained(str(path)).state_dict()
    for method, batch, eps, seed in todo:
        bar.set_postfix_str(f"{method} b{batch} eps{eps} s{seed}")
        steps = max(1, round(args.epochs * (args.train_blocks // batch)))
        engine, losses, seconds = train_cell(method, batch, eps, seed, steps, warm)
        evaluated = time.time()
        held_acc, held_loss = evaluate(engine.module, data["held"], rank, world)
        train_acc, train_loss = evaluate(engine.module, data["train_eval"], rank, world)
        tail = losses[-max(1, steps // max(1, round(args.epochs))):]
        row = {"method": method, "batch": batch, "eps": eps, "seed": seed, "epochs": args.epochs, "steps": steps,
               "train_blocks": args.train_blocks, "heldout_acc": round(held_acc, 4), "heldout_loss": round(held_loss, 4),
               "train_acc": round(train_acc, 4), "train_loss": round(train_loss, 4),
               "last_epoch_loss": round(sum(tail) / len(tail), 4), "seconds": round(seconds, 1),
               "eval_seconds": round(time.time() - evaluated, 1)}
        if rank0():
            if seed == 0 and (method not in ADVERSARIAL or eps == fmt_eps(args.eps)):
                engine.module.save_pretrained(str(out / "models" / f"{method}_b{batch}"))
                data["tokenizer"].save_pretrained(str(out / "models" / f"{method}_b{batch}"))
            append_row(results, FIELDS, row)
            bar.write(json.dumps(row))
        bar.update(1)
        del engine
    bar.close()
    dist.barrier()
    if rank0():
        report(STUDY, read_rows(results), out, subtitle=subtitle(json.loads((out / "study.json").read_text())))


def subtitle(study: dict) -> str:
    b = study["baseline"]
    return (f"{study['corpus']}: {study['train_blocks']} training blocks of {study['seq_len']} tokens, "
            f"{study['epochs']} epochs at every batch, BERT {study['model']} (hidden, layers, heads, intermediate), "
            f"LAMB, every cell from one warm start ({study.get('warm_steps', 0)} LAMB steps at the smallest batch); held-out = {study['eval_blocks']} blocks of unseen documents, {b['heldout_masked_positions']} "
            f"fixed masked positions; most-frequent-token baseline ('{b['token']}'): "
            f"{100 * b['heldout_acc']:.2f}%")


if __name__ == "__main__":
    main()
