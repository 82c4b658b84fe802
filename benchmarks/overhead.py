"""ConAdvEngine with conadv off against the raw DeepSpeedEngine it wraps: step time, 2 CPU ranks.

Both engines train the same model on the same batches; their steps alternate in one run.
Last line: `overhead ratio (ConAdvEngine off / raw DeepSpeed) = X` (goal <= 1.02).

    python benchmarks/overhead.py [--stage 2] [--rounds 30]
"""

import argparse

from harness import alternate, ensure_ranks, say


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args()
    ensure_ranks()

    import deepspeed
    import torch
    import torch.nn.functional as F
    import torchvision

    import conadv_ds

    def config():
        return {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
                "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": args.stage},
                "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}}

    def model():
        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=10)

    raw, *_ = deepspeed.initialize(model=(m := model()), model_parameters=m.parameters(), config=config())
    ours, *_ = conadv_ds.initialize(model=model(), config={**config(), "conadv": {"enabled": False}})
    g = torch.Generator().manual_seed(raw.global_rank)
    x = torch.rand(16, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)

    def raw_step():
        loss = F.cross_entropy(raw(x), y)
        raw.backward(loss)
        raw.step()

    def ours_step():
        ours.train_batch(iter([(x, y)]))

    t = alternate({"raw": raw_step, "ours": ours_step}, rounds=args.rounds)
    say(f"ZeRO-{args.stage}, resnet18 {args.image_size}px, micro-batch 16, 2 ranks: "
        f"raw {t['raw'] * 1e3:.1f} ms/step, ConAdvEngine(off) {t['ours'] * 1e3:.1f} ms/step")
    say(f"overhead ratio (ConAdvEngine off / raw DeepSpeed) = {t['ours'] / t['raw']:.3f}")


if __name__ == "__main__":
    main()
