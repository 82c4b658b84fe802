"""Tokens/s per rank of recipes/bert_pretrain.py on 2 CPU ranks (accelerate launch, DeepSpeed
ZeRO-2): clean, in-process ConAdv (τ = 1) and split (1 trainer + 1 attacker), launched one after
another and `--rounds` times in turn, so that machine noise hits all of them alike; prints the
medians side by side with their ratio to clean. Every training rank runs micro-batches of 16
(`ds_configs/bert_demo.json` without its train_batch_size): 2 trainers for clean and in-process
ConAdv, the 1 trainer of split, whose second rank attacks. A variant the recipe refuses is shown
with the recipe's one-line reason.

    python benchmarks/bert_tokens.py [--model_size mini] [--steps 12] [--rounds 2]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import free_port

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "clean": ("--conadv", "schedule=clean"),
    "conadv τ=1": ("--conadv", "schedule=conadv", "--conadv", "staleness=1"),
    "split τ=1": ("--conadv", "schedule=split", "--conadv", "staleness=1", "--conadv", "attacker_ranks=1"),
}


def launch(args, out: Path, flags) -> tuple[float | None, str]:
    """tokens/s per rank from the recipe's closing line, or None and the recipe's error."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
           str(free_port()), "--use_deepspeed", "--deepspeed_config_file", str(args.config),
           str(ROOT / "recipes" / "bert_pretrain.py"), "--model_size", args.model_size, "--max_steps", str(args.steps),
           "--log_interval", str(args.steps), "--output_dir", str(out), "--tokenizer_dir", str(args.tokenizer),
           "--cache_dir", str(args.cache), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    m = re.search(r"([\d.]+) tokens/s per rank", proc.stdout)
    if m:
        return float(m.group(1)), ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    return None, errors[0] if errors else proc.stderr[-2000:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_size", default="mini")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from conadv_ds.data import text

    work = Path(tempfile.mkdtemp(prefix="bert_tokens_"))
    args.tokenizer, args.cache, args.config = work / "tokenizer", work / "cache", work / "per_rank.json"
    config = json.loads((ROOT / "ds_configs" / "bert_demo.json").read_text())
    del config["train_batch_size"]  # micro-batch 16 per training rank, however many train
    args.config.write_text(json.dumps(config))
    text.train_tokenizer(text.embedded_corpus(), 3000, args.tokenizer)
    rates: dict[str, list[float]] = {k: [] for k in VARIANTS}
    refused: dict[str, str] = {}
    for r in range(args.rounds):
        for name, flags in VARIANTS.items():
            if name in refused:
                continue
            rate, error = launch(args, work / f"{r}_{len(rates[name])}_{name.split()[0]}", flags)
            if rate is None:
                refused[name] = error
            else:
                rates[name].append(rate)
    clean = statistics.median(rates["clean"])
    print(f"BERT-{args.model_size}, sequence 128, micro-batch 16, ZeRO-2, 2 CPU ranks, {args.steps} steps, "
          f"median of {args.rounds} launches")
    print(f"{'variant':<12} {'tokens/s per rank':>18} {'vs clean':>9}")
    for name in VARIANTS:
        if name in refused:
            print(f"{name:<12} {'refused':>18}    {refused[name]}")
        else:
            rate = statistics.median(rates[name])
            print(f"{name:<12} {rate:>18.0f} {rate / clean:>9.2f}")


if __name__ == "__main__":
    main()
