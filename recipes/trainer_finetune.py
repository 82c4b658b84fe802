"""Fine-tune a small BERT classifier with the Hugging Face Trainer and embedding-space ConAdv.

    python recipes/trainer_finetune.py --output_dir runs/finetune
    torchrun --nproc_per_node 2 recipes/trainer_finetune.py --deepspeed ds_configs/trainer_zero2.json

The data is real and offline: paragraphs of Python's own help topics (`pydoc_data.topics`),
labelled by the family of their topic (statements, built-in types, everything else). The
`conadv` block comes from `--conadv_json`, flags, or the `--deepspeed` JSON's own block.
"""

from __future__ import annotations

import argparse

from conadv_ds.cli import one_line_errors, parse_overrides, run_launched

STATEMENTS = {"assert", "assignment", "async", "augassign", "await", "break", "class", "compound", "continue", "del",
              "for", "function", "global", "if", "import", "lambda", "nonlocal", "pass", "raise", "return", "try",
              "while", "with", "yield"}
LABELS = ["statements", "types", "other"]


def topic_family(key: str) -> int:
    if key in STATEMENTS:
        return 0
    if key.startswith(("types", "bltin-")) or key in {"dict", "lists", "numbers", "numeric-types", "strings",
                                                      "string-methods", "integers", "floating", "imaginary",
                                                      "booleans", "callable-types", "sequence-types"}:
        return 1
    return 2


def examples(tokenizer, max_len: int):
    from pydoc_data.topics import topics

    rows = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            words = para.split()
            if len(words) >= 8:
                enc = tokenizer(" ".join(words), truncation=True, max_length=max_len)
                rows.append({**enc, "labels": topic_family(key)})
    return [r for i, r in enumerate(rows) if i % 10], rows[::10]  # train, held out (every tenth paragraph)


@one_line_errors
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/finetune")
    p.add_argument("--deepspeed", help="DeepSpeed JSON (its conadv block is used)")
    p.add_argument("--conadv", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max_len", type=int, default=64)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args(argv)

    import torch
    from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

    from conadv_ds.data.text import embedded_corpus, train_tokenizer
    from conadv_ds.hf import ConAdvTrainer, ConAdvTrainingArguments

    block = {"space": "embedding", "norm": "l2", "epsilon": 0.1, "step_size": 0.05, "targeted": False,
             **parse_overrides(args.conadv)}
    targs = ConAdvTrainingArguments(args.output_dir, per_device_train_batch_size=args.batch_size,
                                    max_steps=args.max_steps, learning_rate=args.lr, warmup_steps=30, logging_steps=25,
                                    eval_strategy="steps", eval_steps=max(args.max_steps // 2, 1), report_to=[],
                                    save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0,
                                    max_grad_norm=0.0 if args.deepspeed else 1.0, deepspeed=args.deepspeed,
                                    conadv=None if args.deepspeed and not args.conadv else block)
    tokenizer = train_tokenizer(embedded_corpus(), 3000)
    train, held = examples(tokenizer, args.max_len)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=256,
                                                     max_position_embeddings=args.max_len, num_labels=len(LABELS)))

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = ConAdvTrainer(model=model, args=targs, train_dataset=train, eval_dataset=held,
                            data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    if trainer.is_world_process_zero():
        for h in trainer.state.log_history:
            if "clean_loss" in h or "eval_accuracy" in h:
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()}, flush=True)


if __name__ == "__main__":
    run_launched(main)
