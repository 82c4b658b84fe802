"""Optimizer step time for a ResNet-50-sized parameter set (25.6M), 2 CPU ranks, 1 thread each.

For LARS and for LAMB, measured in turn in one run (each round calls every step once, so
machine noise hits all alike; the first rounds are warm-up and not timed):

- ours against timm's (`timm.optim.Lars` / `timm.optim.Lamb`) on one rank, each over its own
  copy of the same torchvision resnet50 with the same synthetic gradients, the same
  hyperparameters, and the same exclusion of biases and norm weights from decay and adaptation
  (`param_groups`; timm adapts only groups with weight decay). timm's global gradient clipping
  is off (ours has none; DeepSpeed clips). timm is timed with its default implementation on this
  device and with `foreach=True`, and the faster of the two is the reference. After the timing
  the parameters of ours and timm's are compared (same updates, so they must agree);
- ZeRO-2 on 2 ranks (each rank updates half, norms reduced across ranks) against ours on one
  rank updating everything: the partition update timed inside the engine step.

Ratios are medians over rounds of the ratio within a round (ours and timm's steps of one round
run back to back, so slow drifts of a shared machine cancel). Last line, per optimizer:
`ours/timm=<ratio> zero2_2ranks/1rank=<ratio>`, e.g.
`LARS: ours/timm=0.6 zero2_2ranks/1rank=0.7 | LAMB: ours/timm=0.5 zero2_2ranks/1rank=0.6`.

    python benchmarks/optimizer.py [--rounds 8] [--optimizer LARS|LAMB|both]
"""

import argparse

from harness import alternate, ensure_ranks, rank0, say

HYPER = {"LARS": {"lr": 1.0, "momentum": 0.9, "weight_decay": 5e-5, "trust_coefficient": 0.001, "eps": 0.0},
         "LAMB": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}}


def timm_optimizer(name: str, groups: list, foreach):
    """timm's optimizer with our hyperparameters under its names."""
    from timm.optim import Lamb, Lars

    h = HYPER[name]
    if name == "LARS":
        return Lars(groups, lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"],
                    trust_coeff=h["trust_coefficient"], eps=h["eps"], trust_clip=False, foreach=foreach)
    return Lamb(groups, lr=h["lr"], betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"],
                max_grad_norm=None, trust_clip=False, foreach=foreach)


def measure(name: str, rounds: int) -> tuple[float, float]:
    """(ours/timm on one rank, ZeRO-2 partition update on 2 ranks / ours on one rank)."""
    import statistics
    import time

    import torch
    import torch.nn.functional as F
    import torchvision

    import conadv_ds
    from conadv_ds.optim import LAMB, LARS, param_groups

    h = HYPER[name]
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": 2}, "optimizer": {"type": name, "params": dict(h)}}
    torch.manual_seed(0)
    engine, *_ = conadv_ds.initialize(model=torchvision.models.resnet50(), config=cfg)
    x, y = torch.rand(2, 3, 64, 64), torch.zeros(2, dtype=torch.long)

    steps = {}
    models = {}
    if rank0():  # one rank, unsharded: each optimizer over its own copy of the same model and gradients
        torch.manual_seed(0)
        base = torchvision.models.resnet50()
        grads = [torch.randn_like(p) * 1e-3 for p in base.parameters()]
        for key in ("ours", "timm", "timm_foreach"):
            models[key] = m = torchvision.models.resnet50()
            m.load_state_dict(base.state_dict())
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        groups = {k: param_groups(m, h["weight_decay"]) for k, m in models.items()}
        steps["ours"] = (LARS if name == "LARS" else LAMB)(groups["ours"], **h).step
        steps["timm"] = timm_optimizer(name, groups["timm"], None).step
        steps["timm_foreach"] = timm_optimizer(name, groups["timm_foreach"], True).step

    # The partition update alone (what sharding divides), timed inside the ZeRO-2 step.
    inner = engine.optimizer.optimizer
    inner_times, inner_step = [], inner.step

    def timed_inner_step(*a, **k):  # called once per parameter group within an engine step
        t0 = time.perf_counter()
        out = inner_step(*a, **k)
        inner_times[-1] += time.perf_counter() - t0
        return out

    inner.step = timed_inner_step
    engine.backward(F.cross_entropy(engine(x), y))
    grads_ready = [True]

    def zero2_step():  # the backward (when needed) is outside the timed inner step
        if not grads_ready[0]:
            engine.backward(F.cross_entropy(engine(x), y))
        inner_times.append(0.0)
        engine.step()
        grads_ready[0] = False

    times = {k: [] for k in ("ours", "timm", "timm_foreach")}

    def on_rank0(key):  # rank 1 only meets rank 0 at the barriers between steps
        def step():
            if key in steps:
                t0 = time.perf_counter()
                steps[key]()
                times[key].append(time.perf_counter() - t0)
        return step

    warmup = 2
    alternate({"zero2": zero2_step, **{k: on_rank0(k) for k in times}}, rounds=rounds, warmup=warmup)
    if not rank0():
        return 0.0, 0.0
    times = {k: v[warmup:] for k, v in times.items()}
    times["zero2"] = inner_times[warmup:]
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = min(("timm", "timm_foreach"), key=med.get)

    def paired(a, b):  # median over rounds of a/b within the round: slow drifts of the machine cancel
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    with torch.no_grad():
        diff = max(((a - b).norm() / b.norm()).item() for a, b in
                   zip(models["ours"].parameters(), models[ref].parameters()))
    n = sum(p.numel() for p in models["ours"].parameters())
    say(f"{name}, {n / 1e6:.1f}M parameters, 1 thread, median of {rounds} rounds after {warmup} warm-up:")
    say(f"  1 rank, ours:                         {med['ours'] * 1e3:7.1f} ms")
    say(f"  1 rank, timm (default, foreach=None): {med['timm'] * 1e3:7.1f} ms")
    say(f"  1 rank, timm (foreach=True):          {med['timm_foreach'] * 1e3:7.1f} ms")
    say(f"  ZeRO-2, 2 ranks, partition update:    {med['zero2'] * 1e3:7.1f} ms")
    say(f"  parameters ours vs timm after {rounds + warmup} steps: max relative difference {diff:.1e}")
    say(f"  ratios of the medians: ours/timm {med['ours'] / med[ref]:.3f}, zero2/1rank {med['zero2'] / med['ours']:.3f}"
        f"; per round (median): ours/timm {paired('ours', ref):.3f}, zero2/1rank {paired('zero2', 'ours'):.3f}")
    return paired("ours", ref), paired("zero2", "ours")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--optimizer", default="both", choices=["LARS", "LAMB", "both"])
    args = parser.parse_args()
    ensure_ranks()

    names = ["LARS", "LAMB"] if args.optimizer == "both" else [args.optimizer]
    results = {name: measure(name, args.rounds) for name in names}
    say(" | ".join(f"{name}: ours/timm={r[0]:.3f} zero2_2ranks/1rank={r[1]:.3f}" for name, r in results.items()))


if __name__ == "__main__":
    main()
