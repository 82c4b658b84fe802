"""Step latency of clean, DisAdv, in-process ConAdv and split (1 trainer + 1 attacker) on 2 CPU ranks.

Every mode trains the trainer on the same per-trainer batch: B clean + B adversarial images
(clean mode: 2B clean images), ResNet-18, SGD, ZeRO-0. Launch rank 0 is the trainer in every
mode; in split, launch rank 1 holds the stale weights, computes δ for the next step while the
trainer updates, and sends it back. Modes run in alternating blocks of consecutive steps (the
first step of a block is not timed: an attacker that sat idle during other modes' blocks would
have its first δ ready for free). Printed per attack `steps` (1, 2, 3 by default); the last
line is the ratio for the first of them:

    python benchmarks/step_latency.py [--attack_steps 1 2 3] [--rounds 4] [--block 4]
    ...
    split/clean=X split/disadv=Y
"""

import argparse
import statistics
import time

from harness import ensure_ranks, say

MODES = ("clean", "disadv", "conadv", "split")


def ds_config(micro: int, conadv: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
            "zero_optimization": {"stage": 0}, "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}},
            "conadv": conadv}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--attack_steps", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=4, help="blocks per mode")
    parser.add_argument("--block", type=int, default=4, help="consecutive steps per block (first one untimed)")
    parser.add_argument("--micro", type=int, default=32, help="B: clean (and adversarial) images per step")
    parser.add_argument("--image_size", type=int, default=32)
    args = parser.parse_args()
    ensure_ranks(2)

    import torch
    import torchvision

    import conadv_ds

    def model():
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=10)

    attack = {"epsilon": 8 / 255, "step_size": 2 / 255, "staleness": 1}
    n_split = args.rounds * args.block
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(2 * args.micro, 3, args.image_size, args.image_size, generator=g),
             torch.randint(0, 10, (2 * args.micro,), generator=g)) for _ in range(4)]

    def stream(micro: int, limit: int | None = None):
        i = 0
        while limit is None or i < limit:
            x, y = data[i % len(data)]
            yield x[:micro], y[:micro]
            i += 1

    rows = {}
    for s in args.attack_steps:
        conadv = {**attack, "steps": s}
        split, *_ = conadv_ds.initialize(model=model(), config=ds_config(
            args.micro, {**conadv, "schedule": "split", "attacker_ranks": 1}))
        if split.is_attacker:  # serve the trainer until its data ends
            served = []
            while True:
                try:
                    served.append(split.train_batch())
                except StopIteration:
                    break
            continue
        engines = {
            "clean": conadv_ds.initialize(model=model(), config=ds_config(2 * args.micro, {"enabled": False}))[0],
            "disadv": conadv_ds.initialize(model=model(), config=ds_config(
                args.micro, {**conadv, "schedule": "disadv"}))[0],
            "conadv": conadv_ds.initialize(model=model(), config=ds_config(
                args.micro, {**conadv, "schedule": "conadv"}))[0],
            "split": split,
        }
        iters = {m: stream(2 * args.micro if m == "clean" else args.micro, n_split if m == "split" else None)
                 for m in MODES}
        times: dict[str, list[float]] = {m: [] for m in MODES}
        waits: list[float] = []
        for _ in range(args.rounds):
            for m in MODES:
                for i in range(args.block):
                    t = time.perf_counter()
                    engines[m].train_batch(iters[m])
                    if i > 0:
                        times[m].append(time.perf_counter() - t)
                        if m == "split":
                            waits.append(split.schedule.last_wait)
        try:  # the data has ended: tells the attacker to stop
            split.train_batch(iters["split"])
        except StopIteration:
            pass
        med = {m: statistics.median(v) for m, v in times.items()}
        rows[s] = med
        weights = sum(p.numel() * p.element_size() for p in split.module.parameters())
        say(f"attack steps {s}: " + "  ".join(f"{m} {med[m] * 1e3:6.0f} ms" for m in MODES)
            + f"  | split waited {statistics.median(waits) * 1e3:.0f} ms/step for δ; sent "
            f"{weights / 2**20:.0f} MiB of weights/step | split/clean={med['split'] / med['clean']:.3f} "
            f"split/disadv={med['split'] / med['disadv']:.3f} conadv/disadv={med['conadv'] / med['disadv']:.3f}")
    if rows:
        first = rows[args.attack_steps[0]]
        say(f"resnet18 {args.image_size}px, B={args.micro} clean + {args.micro} adversarial per step, ZeRO-0, "
            f"1 trainer (+1 attacker in split), medians of {args.rounds * (args.block - 1)} steps per mode")
        say(f"split/clean={first['split'] / first['clean']:.3f} split/disadv={first['split'] / first['disadv']:.3f}")


if __name__ == "__main__":
    main()
