"""The report of a large-batch study, from its CSV alone: per-cell statistics over seeds, the cost of
each method against the reference optimizer, the share of the reference's large-batch gap each
method closes, and the accuracy-vs-batch plot. Shared by `large_batch.py` (vision) and
`bert_large_batch.py` (masked LM)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Study:
    """What a study's CSV holds and how to name it."""

    reference: str
    """The plain optimizer every method is compared with (`lars`, `lamb`)."""
    methods: tuple[str, ...]
    """All methods, in report order."""
    adversarial: tuple[str, ...]
    """The methods whose ε column means something."""
    eps_label: str
    test: str
    """CSV column of the held-out accuracy (a fraction)."""
    train: str
    """CSV column of the accuracy on the training data (a fraction)."""
    eps: str = "eps"
    """CSV column of ε."""
    metric: str = "top-1"
    test_name: str = "test"
    unit: str = "images"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def append_row(path: Path, fields: list[str], row: dict) -> None:
    """One finished cell appended to a study's CSV (the header written with the first row)."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)


def check_settings(out: Path, settings: dict) -> None:
    """`study.json` records what the rows were trained with; resuming with other settings stops."""
    path = out / "study.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{out}: its results were trained with other settings {diff} (recorded, given); "
                             "use another --output_dir")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _eps(v) -> str:
    return f"{float(v):g}"


def summarize(study: Study, rows: list[dict]) -> dict:
    """Per-cell statistics over seeds, the extra cost vs the reference, and the share of its gap closed.

    - cell: mean ± std (sample std over seeds) of held-out and train accuracy, of the gap train −
      held-out, and of the training seconds; `cost_vs_reference` = mean over seeds of seconds / the
      reference's seconds at the same batch and seed.
    - closed: for each batch B above the smallest b0, G = mean(reference at b0) − mean(reference at
      B); per seed s, (acc[m, B, s] − acc[reference, B, s]) / G; reported as mean ± std over the
      seeds both cells have.
    """
    cells: dict[tuple[str, int, str], dict[int, dict]] = {}
    for r in rows:
        key = (r["method"], int(r["batch"]), _eps(r[study.eps]))
        cells.setdefault(key, {})[int(r["seed"])] = {"test": float(r[study.test]), "train": float(r[study.train]),
                                                    "seconds": float(r["seconds"])}
    ref = {b: v for (m, b, _), v in cells.items() if m == study.reference}

    def order(kv):
        (m, b, e) = kv[0]
        return b, study.methods.index(m), float(e)

    out = {"cells": [], "closed": []}
    for (m, b, e), by_seed in sorted(cells.items(), key=order):
        seeds = sorted(by_seed)
        test = [by_seed[s]["test"] for s in seeds]
        train = [by_seed[s]["train"] for s in seeds]
        c = {"method": m, "batch": b, "eps": e, "seeds": seeds, "n": len(seeds), "test": _mean_std(test),
             "train": _mean_std(train), "gap": _mean_std([tr - te for tr, te in zip(train, test)]),
             "seconds": _mean_std([by_seed[s]["seconds"] for s in seeds])}
        paired = [s for s in seeds if s in ref.get(b, {})]
        c["cost_vs_reference"] = (statistics.fmean(by_seed[s]["seconds"] / ref[b][s]["seconds"] for s in paired)
                                  if paired else None)
        out["cells"].append(c)
    batches = sorted({b for (_, b, _) in cells})
    if batches and batches[0] in ref:
        b0 = batches[0]
        top = statistics.fmean(v["test"] for v in ref[b0].values())
        for b in batches[1:]:
            if b not in ref:
                continue
            gap = top - statistics.fmean(v["test"] for v in ref[b].values())
            for (m, bb, e), by_seed in sorted(cells.items(), key=order):
                paired = sorted(s for s in by_seed if s in ref[b])
                if bb != b or m == study.reference or not paired:
                    continue
                fr = [(by_seed[s]["test"] - ref[b][s]["test"]) / gap if gap != 0 else math.nan for s in paired]
                out["closed"].append({"method": m, "batch": b, "eps": e, "reference_batch": b0,
                                      "reference_gap": gap, "seeds": paired, "fraction": _mean_std(fr)})
    return out


def report(study: Study, rows: list[dict], out: Path, subtitle: str) -> dict:
    """results.md (tables), summary.json (the same numbers) and accuracy_vs_batch.png, from the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise SystemExit(f"{out}: no rows to report")
    s = summarize(study, rows)
    ref = study.reference.upper()

    def pm(ms, k=100, d=2):
        return f"{ms[0] * k:.{d}f} ± {ms[1] * k:.{d}f}"

    def eps_of(c):
        return c["eps"] if c["method"] in study.adversarial else "–"

    lines = [(f"{subtitle}; {study.metric} in %, mean ± std over seeds; gap = train − {study.test_name}; time = "
              f"training seconds per cell on 2 CPU ranks; cost = time / {ref}'s at the same batch and seed."), "",
             f"| method | {study.eps_label} | batch | seeds | {study.test_name} {study.metric} | train {study.metric} | "
             "gap | time (s) | cost vs " + ref + " |", "|---|---|---|---|---|---|---|---|---|"]
    for c in s["cells"]:
        cost = f"{c['cost_vs_reference']:.2f}×" if c["cost_vs_reference"] is not None else "–"
        lines.append(f"| {c['method']} | {eps_of(c)} | {c['batch']} | {c['n']} | {pm(c['test'])} | "
                     f"{pm(c['train'])} | {pm(c['gap'])} | {c['seconds'][0]:.0f} ± {c['seconds'][1]:.0f} | {cost} |")
    if s["closed"]:
        lines += ["", (f"Share of the {ref} generalization gap closed (per seed: (method − {ref}) at batch B, divided "
                       f"by mean {ref} {study.test_name} at the smallest batch − mean {ref} {study.test_name} at B; "
                       "mean ± std over seeds):"), "",
                  f"| method | {study.eps_label} | batch | {ref} gap (points) | closed |", "|---|---|---|---|---|"]
        for c in s["closed"]:
            lines.append(f"| {c['method']} | {eps_of(c)} | {c['batch']} | {c['reference_gap'] * 100:.2f} vs batch "
                         f"{c['reference_batch']} | {c['fraction'][0]:.0%} ± {c['fraction'][1]:.0%} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    print(text, flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    batches = sorted({c["batch"] for c in s["cells"]})
    for i, m in enumerate(m for m in study.methods if any(c["method"] == m for c in s["cells"])):
        per_eps: dict[str, list] = {}
        for c in s["cells"]:
            if c["method"] == m:
                per_eps.setdefault(c["eps"], []).append(c)
        main_eps = max(per_eps, key=lambda e: len(per_eps[e]))  # the ε run at every batch; the sweep's are points
        for e, cs in per_eps.items():
            cs = sorted(cs, key=lambda c: c["batch"])
            style = {"marker": "o", "capsize": 3, "color": f"C{i}"}
            if e != main_eps:
                style.update(marker="^" if float(e) > float(main_eps) else "v", linestyle="none", alpha=0.7)
            for ax, k in zip(axes, ("test", "train")):
                ax.errorbar([c["batch"] for c in cs], [c[k][0] * 100 for c in cs], yerr=[c[k][1] * 100 for c in cs],
                            label=m + (f" ε={e}" if m in study.adversarial else ""), **style)
    for ax, k in zip(axes, (study.test_name, "train (clean, eval mode)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel(f"global batch size ({study.unit})")
        ax.set_ylabel(f"{k} {study.metric} (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"same epochs at every batch, {ref}", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_batch.png", dpi=110)
    plt.close(fig)
    return s
