"""Runs on 2 CPU ranks: LARS and LAMB through conadv_ds.initialize under ZeRO 0-3, plus a
"naive" run whose optimizer is not told the ZeRO layout (trust ratios per partition), and
ZeRO-2 with the optimizer offloaded to the CPU.

Stages 1 and 3 (and the offload run) use small CPU blocks, so that every layer is cut into
several chunks; 0 and 2 the default blocks. Every collective call made inside the inner
optimizer's step is recorded (tensor device, elements), per step call, with the devices of the
parameters that step updates. Last, each optimizer on a flat tensor of which rank 1 owns no
piece, over a gloo group with a short timeout (a rank that skipped the reduction would make the
other one time out instead of hang); every rank saves its own result."""

import argparse
import os
import sys
from datetime import timedelta

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402

import conadv_ds  # noqa: E402
from conadv_ds import optim  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from conadv_ds.optim import LAMB, LARS, multi_tensor  # noqa: E402
from conadv_ds.optim.zero_layout import FlatLayout  # noqa: E402
from tests.test_optim import MICRO, OPTIMIZERS, make_mlp, mlp_batches  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce", "all_to_all_single")


class Recorder:
    """Wraps torch.distributed's collectives; logs the calls made while `active`."""

    def __init__(self):
        self.active, self.calls, self.devices = False, [], set()
        for name in COLLECTIVES:
            original = getattr(torch.distributed, name)
            setattr(torch.distributed, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def collective(*args, **kwargs):
            if self.active:
                for a in (*args, *kwargs.values()):
                    for t in a if isinstance(a, (list, tuple)) else [a]:
                        if isinstance(t, torch.Tensor):
                            self.calls[-1].append((name, str(t.device), t.numel()))
            return original(*args, **kwargs)
        return collective

    def watch(self, optimizer):
        """Record the collectives of each `optimizer.step()` call as one list."""
        step = optimizer.step

        def watched(*args, **kwargs):
            self.calls.append([])
            self.devices.update(str(p.device) for g in optimizer.param_groups for p in g["params"])
            self.active = True
            try:
                return step(*args, **kwargs)
            finally:
                self.active = False
        optimizer.step = watched


RECORDER = Recorder()


def run(stage, name, naive=False, offload=False, block=None):
    multi_tensor.BLOCK_ELEMENTS = block
    model = make_mlp()
    zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
           "zero_optimization": zero, "optimizer": OPTIMIZERS[name]}
    engine, *_ = conadv_ds.initialize(model=model, config=cfg)
    inner = engine.optimizer
    while not isinstance(inner, (LARS, LAMB)):
        inner = inner.optimizer
    if naive:
        inner.bind_layouts({})
    RECORDER.calls, RECORDER.devices = [], set()
    RECORDER.watch(inner)
    rank = engine.global_rank
    for x, y in mlp_batches():
        xs, ys = x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO]
        engine.train_batch(iter([(xs, ys)]))
    ps = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(ps):
        params = [p.detach().clone() for p in ps]
    return {"params": params, "collectives": RECORDER.calls, "param_devices": RECORDER.devices}


def rank_without_a_piece() -> dict:
    """A flat tensor of 3 layers × 2 elements: rank 0 owns every piece, rank 1 none (its flat
    tensor is padding: zeros). Both step once; rank 0's result next to the same optimizer on the
    3 layers as separate parameters in this process (nothing to reduce)."""
    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=20))
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(0)
    w, grad = torch.randn(6, generator=g), torch.randn(6, generator=g)
    out = {}
    for name in OPTIMIZERS:
        multi_tensor.BLOCK_ELEMENTS = None
        flat = nn.Parameter(w.clone() if rank == 0 else torch.zeros(6))
        flat.grad = grad.clone() if rank == 0 else torch.zeros(6)
        opt = getattr(optim, name)([{"params": [flat], "weight_decay": 0.0, "adapt": True}],
                                   **OPTIMIZERS[name]["params"])
        opt.bind_layouts({id(flat): FlatLayout(num_layers=3, segments=[(i, 2 * i, 2) for i in range(3)] if rank == 0
                                               else [], group=group)})
        try:
            opt.step()
            error = None
        except RuntimeError as e:  # the other rank did not take part in the reduction
            error = str(e).splitlines()[0]
        layers = [nn.Parameter(w[2 * i:2 * i + 2].clone()) for i in range(3)]
        for i, p in enumerate(layers):
            p.grad = grad[2 * i:2 * i + 2].clone()
        alone = getattr(optim, name)([{"params": layers, "weight_decay": 0.0, "adapt": True}],
                                     **OPTIMIZERS[name]["params"])
        alone.step()
        out[name] = {"error": error, "flat": flat.detach().clone(),
                     "alone": torch.cat([p.detach() for p in layers]), "start": w}
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    small = 1000  # elements: the 64×64 layer in 5 chunks, the partition boundary inside one
    results = {f"{name}/z{stage}": run(stage, name, block=small if stage % 2 else None)
               for stage in (0, 1, 2, 3) for name in OPTIMIZERS}
    results["LARS/z2/naive"] = run(2, "LARS", naive=True)
    results["LAMB/z1/naive"] = run(1, "LAMB", naive=True)
    results["LAMB/z2/offload"] = run(2, "LAMB", offload=True, block=small)
    from deepspeed.accelerator import get_accelerator

    results["accelerator_device"] = str(torch.device(get_accelerator().current_device_name()))
    no_piece = rank_without_a_piece()
    if torch.distributed.get_rank() == 0:
        torch.save(results, args.out)
    torch.save(no_piece, f"{args.out}.no_piece{torch.distributed.get_rank()}")


if __name__ == "__main__":
    run_launched(main)
