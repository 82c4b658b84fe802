"""What in-process ConAdv costs next to DisAdv, on 2 CPU ranks under ZeRO-3.

- memory each rank holds for the schedule, accounted (`stale_bytes()`) and measured (the tensor
  storage reachable from the schedule and not from DeepSpeed's engine or the data iterator):
  lookahead (τ=1) keeps the next step's batches and their δ, no weights; a sharded snapshot
  keeps this rank's shard of each old version plus the buffers (goal <= 1.05 × model/N per copy);
- step time of conadv (lookahead and snapshot) over disadv: in one process the work is the
  same (one attack per batch), so the ratio should be ≈ 1.0 — only the split schedule hides
  the attack's time.

    python benchmarks/conadv_cost.py [--stage 3] [--rounds 15]
"""

import argparse

from harness import alternate, ensure_ranks, held_bytes, say


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--image_size", type=int, default=32)
    args = parser.parse_args()
    ensure_ranks()

    import torch
    import torch.distributed as dist
    import torchvision

    import conadv_ds

    schedules = {
        "disadv": {"schedule": "disadv"},
        "conadv-lookahead": {"schedule": "conadv", "staleness": 1},
        "conadv-snapshot": {"schedule": "conadv", "staleness": 1, "stale_weights": "snapshot"},
        "conadv-snapshot-tau2": {"schedule": "conadv", "staleness": 2},
    }
    engines = {}
    for name, block in schedules.items():
        torch.manual_seed(0)
        cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
               "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": args.stage},
               "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}, "conadv": block}
        engines[name], *_ = conadv_ds.initialize(model=torchvision.models.resnet18(num_classes=10), config=cfg)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    data = [(torch.rand(16, 3, args.image_size, args.image_size, generator=g),
             torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]

    def stream():  # fresh tensors per batch, as a DataLoader gives
        while True:
            yield from ((x.clone(), y.clone()) for x, y in data)

    iters = {name: stream() for name in engines}
    steps = {name: (lambda e=e, it=iters[name]: e.train_batch(it)) for name, e in engines.items()}
    t = alternate(steps, rounds=args.rounds)
    model_bytes = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                      for p in engines["disadv"].module.parameters()) * 4
    share = model_bytes / dist.get_world_size()
    say(f"ZeRO-{args.stage}, resnet18 {args.image_size}px, micro-batch 16 (+16 adversarial), 2 ranks, "
        f"model {model_bytes / 2**20:.1f} MiB fp32, model/N {share / 2**20:.1f} MiB")
    mine = {name: (e.stale_bytes(), held_bytes(e.schedule, e.ds, iters[name])) for name, e in engines.items()}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    mib = 2 ** 20
    for name in engines:
        cells = "  ".join(f"rank {r}: {m[name][1] / mib:6.2f} MiB measured ({m[name][0] / mib:6.2f} accounted)"
                          for r, m in enumerate(per_rank))
        say(f"  {name:22s} {t[name] * 1e3:7.1f} ms/step  {cells}  = {mine[name][1] / share:.3f} × model/N")
    say(f"conadv-lookahead/disadv={t['conadv-lookahead'] / t['disadv']:.3f} "
        f"conadv-snapshot/disadv={t['conadv-snapshot'] / t['disadv']:.3f} "
        f"snapshot_bytes/(model/N)={mine['conadv-snapshot'][1] / share:.3f} "
        f"lookahead_bytes/(batch+δ)={mine['conadv-lookahead'][1] / (2 * data[0][0].nbytes + data[0][1].nbytes):.3f}")


if __name__ == "__main__":
    main()
