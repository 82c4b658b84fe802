"""Runs on 1 rank: the vision recipe (2 steps on the embedded digits) with `--compile` through a
counting backend, `--channels_last` and `--num_workers 1`, ConAdv on and off; then under bf16
without buffer_dtype. Records what the DataLoaders and `conadv_ds.initialize` were given and
how often the compiled graph ran."""

import argparse
import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import conadv_ds  # noqa: E402
from conadv_ds.bn import is_fp32_batchnorm  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from conadv_ds.data import vision  # noqa: E402
from tests.distributed import ROOT  # noqa: E402

CALLS: list[int] = []
LOADERS: list[list] = []
MODELS: list = []


def graph_calls(gm, example_inputs):
    """A torch.compile backend that runs the captured graph as it is and counts its calls."""
    def run(*args):
        CALLS.append(len(args))
        return gm.forward(*args)
    return run


class RecordingLoader(torch.utils.data.DataLoader):
    def __init__(self, *args, **kwargs):
        LOADERS.append([kwargs["num_workers"], kwargs["persistent_workers"], kwargs["pin_memory"],
                        isinstance(kwargs.get("collate_fn"), vision.channels_last)])
        super().__init__(*args, **kwargs)


def recording_initialize(initialize):
    def call(model=None, **kw):
        MODELS.append(model)
        return initialize(model=model, **kw)
    return call


def recipe(out: str, config: str, *flags: str) -> None:
    CALLS.clear(), LOADERS.clear(), MODELS.clear()
    torch._dynamo.reset()
    main = runpy.run_path(str(ROOT / "recipes" / "resnet_imagenet.py"))["main"]
    main(["--deepspeed_config", config, "--max_steps", "2", "--eval_interval", "0", "--eval_steps", "1",
          "--output_dir", out, *flags])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    torch._dynamo.backends.registry.register_backend(graph_calls, name="graph_calls")
    vision.DataLoader = RecordingLoader
    conadv_ds.initialize = recording_initialize(conadv_ds.initialize)
    demo = str(ROOT / "ds_configs" / "demo.json")
    result = {}
    flags = ("--compile", "graph_calls", "--channels_last", "--num_workers", "1")
    for name, extra in (("on", ()), ("off", ("--conadv", "enabled=false"))):
        recipe(f"{out}/{name}", demo, *flags, *extra)
        result[name] = {"graph_calls": len(CALLS), "loaders": [k[:3] for k in LOADERS], "channels_last_collate": [k[3] for k in LOADERS]}
    cfg = json.loads(open(demo).read())
    cfg["bf16"] = {"enabled": True}
    with open(f"{out}/bf16.json", "w") as f:
        json.dump(cfg, f)
    recipe(f"{out}/bf16", f"{out}/bf16.json")
    layers = [m for m in MODELS[0].modules() if isinstance(m, _BatchNorm)]
    result["bf16"] = {
        "layers": len(layers), "fp32_layers": sum(is_fp32_batchnorm(m) for m in layers),
        "aux_layers": sum(hasattr(m, "aux") for m in layers),
        "running_dtypes": sorted({str(m.running_var.dtype) for m in layers}),
        "trained_fp32_stats": sum(int(m.num_batches_tracked) > 0 and not torch.equal(m.running_var, torch.ones_like(
            m.running_var)) for m in layers),
        "weight_dtypes": sorted({str(p.dtype) for m in layers for p in m.parameters()})}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    run_launched(main)
