"""Runs on 2 CPU ranks: calls that make the host wait for the device (`tests.common.counting_host_syncs`:
reads and copies to the host, device synchronisations), per optimizer step, of
ConAdvEngine.train_batch against a raw DeepSpeed loop over the same micro-batches, and of the
ConAdvTrainer against the plain Trainer under DeepSpeed ZeRO-2, at gradient accumulation 1 and 4;
and the device of every tensor handed to a collective."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import conadv_ds  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from tests.common import DETERMINISTIC, counting_host_syncs, digits_batches, ds_config, make_model  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


class CollectiveDevices:
    """The device of every tensor handed to a torch.distributed collective inside `with watch:`."""

    def __init__(self):
        self.devices = set()
        self.active = False
        for name in COLLECTIVES:
            original = getattr(dist, name)
            setattr(dist, name, self._watching(original))

    def __enter__(self):
        self.active = True

    def __exit__(self, *exc):
        self.active = False

    def _watching(self, original):
        def collective(*args, **kwargs):
            if self.active:
                for a in [*args, *kwargs.values()]:
                    for x in (a if isinstance(a, (list, tuple)) else [a]):
                        if isinstance(x, torch.Tensor):
                            self.devices.add(str(x.device))
            return original(*args, **kwargs)
        return collective


def rank_slice(batch, rank):
    x, y = batch
    n = len(x) // 2
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def uneven_zero3_evaluation() -> dict:
    """ZeRO-3 evaluation of 33 images at batch 8 on 2 ranks (17 and 16: 3 batches against 2
    without padding, where the rank with one more forward would wait alone for a gather), and
    the same counts from a plain copy of the model over all 33 images in one process."""
    from torch.utils.data import TensorDataset

    from conadv_ds.data.vision import eval_loader
    from conadv_ds.evaluation import evaluate

    engine, *_ = conadv_ds.initialize(model=make_model(), config=ds_config(3, 1, DETERMINISTIC))
    x, y = (torch.cat(t) for t in zip(*[mb for s in digits_batches(3) for mb in s]))
    images = TensorDataset(x[:33], y[:33])
    loader = eval_loader(images, 8, dist.get_rank(), dist.get_world_size())
    ours = evaluate(engine.module, loader, epsilon=0.05, steps=1, device=engine.device)
    plain = make_model()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        plain.load_state_dict({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
    plain.eval()
    with torch.no_grad():
        logits = plain(x[:33])
    top5 = (logits.topk(5, dim=-1).indices == y[:33, None]).any(dim=-1)
    return {"ours": ours, "batches_per_rank": len(loader), "plain_top1": int((logits.argmax(-1) == y[:33]).sum()),
            "plain_top5": int(top5.sum())}


def split(count) -> dict:
    """{"reads": host reads and copies, "device": device synchronisations} of a count."""
    return {"reads": count.count - count.device_syncs, "device": count.device_syncs}


def trainer_syncs(out: str) -> dict:
    """Whole `train()` (4 steps, logging every 2) of the ConAdvTrainer and of the plain Trainer,
    both under DeepSpeed ZeRO-2 from the same ViT, at gradient accumulation 1 and 4. A ViT's
    forward reads nothing to the host (BERT's sdpa mask check in transformers does, once per forward)."""
    from tests.test_hf_trainer import models
    from tests.workers.hf_worker import run

    make, data, block = models()["vit"]
    result = {}
    for gas in (1, 4):
        for plain in (False, True):
            with counting_host_syncs() as count:
                run(f"{out}/trainer{gas}{plain}", 2, block, make, data=data, gas=gas, plain=plain)
            result[f"{'plain' if plain else 'ours'}_gas{gas}"] = split(count)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    watch = CollectiveDevices()
    result = {}
    steps = 3
    for gas in (1, 4):
        batches = [rank_slice(mb, int(os.environ["RANK"])) for s in digits_batches(steps + 2, gas) for mb in s]
        engine, *_ = conadv_ds.initialize(model=make_model(), config=ds_config(2, gas, DETERMINISTIC))
        data = iter(batches)
        engine.train_batch(data)  # warm-up step (first-step set-up is not per-step cost)
        with watch, counting_host_syncs() as count:
            for _ in range(steps):
                engine.train_batch(data)
        result[f"ours_gas{gas}"] = {k: v / steps for k, v in split(count).items()}
        result["engine_device"] = str(engine.device)
        plain = make_model()
        raw, *_ = deepspeed.initialize(model=plain, model_parameters=plain.parameters(), config=ds_config(2, gas))
        data = iter(batches)
        for _ in range(gas):
            x, y = next(data)
            raw.backward(F.cross_entropy(raw(x), y))
            raw.step()
        with watch, counting_host_syncs() as count:
            for _ in range(steps * gas):
                x, y = next(data)
                raw.backward(F.cross_entropy(raw(x), y))
                raw.step()
        result[f"raw_gas{gas}"] = {k: v / steps for k, v in split(count).items()}
    from conadv_ds.evaluation import evaluate

    with watch:
        evaluate(engine.module, [rank_slice(digits_batches(1)[0][0], 0)], epsilon=0.05, steps=1, device=engine.device)
    result["collective_devices"] = sorted(watch.devices)
    result["uneven_zero3"] = uneven_zero3_evaluation()
    result["trainer"] = trainer_syncs(out)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    run_launched(main)
