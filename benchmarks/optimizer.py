"""Optimizer step time for a ResNet-50-sized parameter set (25.6M), 2 CPU ranks.

- ZeRO-2 on 2 ranks (each rank updates half, then the halves are all-gathered) against one rank
  updating everything (plain, unsharded): sharding must pay, goal <= 0.65;
- our LARS against timm's LARS on one rank (same parameters, same gradients).

All are measured in turn in one run. Last line: `zero2_2ranks/1rank=X ours/timm_lars=Y`, X for the optimizer update; the line before
also gives the whole engine step, which adds DeepSpeed's gradient norm and the weight all-gather
(on CPU/gloo that communication dominates).

    python benchmarks/optimizer.py [--rounds 8] [--optimizer LARS|LAMB]
"""

import argparse

from harness import alternate, ensure_ranks, say


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--optimizer", default="LARS", choices=["LARS", "LAMB"])
    args = parser.parse_args()
    ensure_ranks()

    import time

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import torchvision

    import conadv_ds
    from conadv_ds.optim import LAMB, LARS, param_groups

    params = {"LARS": {"lr": 1.0, "momentum": 0.9, "weight_decay": 5e-5, "trust_coefficient": 0.001},
              "LAMB": {"lr": 1e-3, "weight_decay": 0.01}}[args.optimizer]
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": 2}, "optimizer": {"type": args.optimizer, "params": params}}
    torch.manual_seed(0)
    engine, *_ = conadv_ds.initialize(model=torchvision.models.resnet50(), config=cfg)
    x, y = torch.rand(2, 3, 64, 64), torch.zeros(2, dtype=torch.long)
    rank = dist.get_rank()

    # One rank, unsharded: the same optimizer class over the full model, and timm's LARS.
    single = torchvision.models.resnet50()
    for p in single.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    ours = (LARS if args.optimizer == "LARS" else LAMB)(param_groups(single, params["weight_decay"]), **params)
    from timm.optim import Lars

    timm_lars = Lars(param_groups(single, params["weight_decay"]), lr=1.0, momentum=0.9,
                     trust_coeff=0.001, trust_clip=False)
    # The partition update alone (what sharding divides), timed inside the ZeRO-2 step.
    inner = engine.optimizer.optimizer
    inner_times, inner_step = [], inner.step

    def timed_inner_step(*a, **k):  # called once per parameter group within an engine step
        t0 = time.perf_counter()
        out = inner_step(*a, **k)
        inner_times[-1] += time.perf_counter() - t0
        return out

    inner.step = timed_inner_step
    # Same gradients for every ZeRO-2 step: the backward is done once, outside the timing.
    loss = F.cross_entropy(engine(x), y)
    engine.backward(loss)
    grads_ready = [True]

    def zero2_step():
        if not grads_ready[0]:
            engine.backward(F.cross_entropy(engine(x), y))
        inner_times.append(0.0)
        t0 = time.perf_counter()
        engine.step()
        grads_ready[0] = False
        return time.perf_counter() - t0

    def on_rank0(opt):
        def step():
            if rank == 0:
                opt.step()
        return step

    # The ZeRO-2 step is timed inside (without its backward); the others whole.
    zero2_times = []
    timed = alternate({"zero2": lambda: zero2_times.append(zero2_step()), "single_ours": on_rank0(ours),
                       "single_timm": on_rank0(timm_lars) if args.optimizer == "LARS" else (lambda: None)},
                      rounds=args.rounds)
    def median(v):
        return sorted(v)[len(v) // 2]

    z2, z2_update = median(zero2_times[2:]), median(inner_times[2:])
    n = sum(p.numel() for p in single.parameters())
    say(f"{args.optimizer}, {n / 1e6:.1f}M parameters, 1 thread per rank:")
    say(f"  ZeRO-2, 2 ranks, whole engine step:  {z2 * 1e3:.1f} ms (gradient norm, update, all-gather)")
    say(f"  ZeRO-2, 2 ranks, partition update:   {z2_update * 1e3:.1f} ms")
    say(f"  1 rank, unsharded, ours:             {timed['single_ours'] * 1e3:.1f} ms")
    if args.optimizer == "LARS":
        say(f"  1 rank, unsharded, timm Lars:        {timed['single_timm'] * 1e3:.1f} ms")
    tail = f" ours/timm_lars={timed['single_ours'] / timed['single_timm']:.3f}" if args.optimizer == "LARS" else ""
    say(f"zero2_2ranks/1rank: update {z2_update / timed['single_ours']:.3f}, whole step {z2 / timed['single_ours']:.3f}")
    say(f"zero2_2ranks/1rank={z2_update / timed['single_ours']:.3f}{tail}")


if __name__ == "__main__":
    main()
