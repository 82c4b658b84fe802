"""What feeds a GPU, tested on the CPU: loader workers and pinned memory, channels-last images,
torch.compile of the model with the attack inside it, and BatchNorm in fp32 under bf16."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from conadv_ds.data import vision
from tests.distributed import launch


class Decoded(Dataset):
    """Items made on access (as a JPEG folder's), not a tensor already in memory."""

    def __init__(self, n: int = 48):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_loader_defaults_per_rank(monkeypatch):
    """No workers for in-memory tensors; for decoded items the CPUs shared among the node's ranks
    less one for the rank itself, at least 1 and at most 8; pinned memory on accelerators only;
    workers persistent across epochs; an explicit count wins."""
    monkeypatch.setattr(vision.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    decoded, in_memory = Decoded(), TensorDataset(torch.zeros(4, 1))
    assert vision.LoaderOptions.for_rank(in_memory, "cpu") == vision.LoaderOptions(0, False)
    assert vision.LoaderOptions.for_rank(decoded, "cpu") == vision.LoaderOptions(7, False)
    assert vision.LoaderOptions.for_rank(decoded, torch.device("cuda", 1)) == vision.LoaderOptions(7, True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert vision.LoaderOptions.for_rank(decoded, "cpu").num_workers == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert vision.LoaderOptions.for_rank(decoded, "cpu").num_workers == 1
    assert vision.LoaderOptions.for_rank(decoded, "cpu", num_workers=3).num_workers == 3
    assert vision.LoaderOptions(2, True).kwargs() == {"num_workers": 2, "pin_memory": True, "persistent_workers": True}
    assert vision.LoaderOptions().kwargs()["persistent_workers"] is False


def test_workers_and_channels_last_keep_the_stream():
    """Two workers and the channels-last collate give the micro-batches of the plain loader, in
    order, across an epoch boundary: the values are the same, only the memory format changes."""
    data = Decoded()
    plain = vision.train_stream(data, 8, rank=1, world_size=2, seed=3)
    fed = vision.train_stream(data, 8, rank=1, world_size=2, seed=3, options=vision.LoaderOptions(2),
                              collate_fn=vision.channels_last())
    for _ in range(7):  # 3 micro-batches per epoch on this rank
        (x, y), (fx, fy) = next(plain), next(fed)
        assert torch.equal(x, fx) and torch.equal(y, fy)
        assert fx.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
            memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    """The vision recipe on one rank, 2 steps each: compiled by a recording backend, channels-last,
    one loader worker, ConAdv on and off; and under bf16 (tests/workers/speed_worker.py)."""
    import json

    out = tmp_path_factory.mktemp("speed")
    launch("speed_worker.py", "--out", str(out), nproc=1)
    return json.loads((out / "result.json").read_text())


def test_compile_runs_the_attack_through_the_compiled_model_in_channels_last(recipe_runs):
    """`--compile` compiles the model's forward, so the attack's forwards run through the graph
    too: with ConAdv on, more graph calls than with it off by at least one per attacked
    micro-batch (2 steps × 2 micro-batches × 1 attack step); `--channels_last` puts the
    channels-last collate on the training loader (its effect: test_workers_and_channels_last_
    keep_the_stream; the embedded digits have one channel, where both formats coincide);
    `--num_workers 1` reaches both loaders (persistent, not pinned on the CPU)."""
    on, off = recipe_runs["on"], recipe_runs["off"]
    assert on["graph_calls"] - off["graph_calls"] >= 2 * 2, (on, off)
    assert on["loaders"] == [[1, True, False]] * 2, on  # evaluation, training
    assert on["channels_last_collate"] == [False, True], on


def test_the_recipe_keeps_batchnorm_in_fp32_under_bf16(recipe_runs):
    """bf16 without buffer_dtype (as the paper configs) on the demo data: every BatchNorm,
    auxiliary branches included, normalises in fp32; its running statistics are fp32 and
    trained; its weights are DeepSpeed's bf16."""
    bn = recipe_runs["bf16"]
    assert bn["layers"] > 0 and bn["fp32_layers"] == bn["layers"] and bn["aux_layers"] > 0, bn
    assert bn["running_dtypes"] == ["torch.float32"] and bn["trained_fp32_stats"] > 0, bn
    assert bn["weight_dtypes"] == ["torch.bfloat16"], bn


def test_fp32_batchnorm_is_torchs_batchnorm_computed_in_fp32():
    """Against torch's own BatchNorm: identical in fp32 (outputs and running statistics, train and
    eval); with bf16 weights and input, torch's fp32 BatchNorm on the same (rounded) values, the
    output rounded to bf16, running statistics fp32. The plain bf16 BatchNorm differs (control)."""
    from conadv_ds.bn import fp32_batchnorm

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    fresh = copy.deepcopy(ref)
    ours = fp32_batchnorm(copy.deepcopy(ref))
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    for mode in (True, True, False):
        ref.train(mode), ours.train(mode)
        assert torch.equal(ref(x), ours(x))
    assert torch.equal(ref[1].running_var, ours[1].running_var) and ours[1].num_batches_tracked == 2

    half = fp32_batchnorm(copy.deepcopy(fresh).to(torch.bfloat16))
    ref32 = copy.deepcopy(fresh)
    ref32[1].weight.data, ref32[1].bias.data = (half[1].weight.float(), half[1].bias.float())
    h = half[0](x.bfloat16())
    for _ in range(3):
        out, expected = half[1](h), ref32[1](h.float()).bfloat16()
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert half[1].running_var.dtype == torch.float32 and torch.equal(half[1].running_var, ref32[1].running_var)
    plain = copy.deepcopy(fresh).to(torch.bfloat16)
    for _ in range(3):
        plain[1](h)
    assert (plain[1].running_var.float() - ref32[1].running_var).abs().max() > 1e-3


@pytest.mark.parametrize("buffer_dtype,fp32,error", [
    (None, False, r'bf16.enabled=true with BatchNorm.*fp32_batchnorm\(model\).*"buffer_dtype": "bf16"'),
    ("bf16", True, r"data_types.buffer_dtype='bf16' with fp32 BatchNorm .*remove buffer_dtype"),
])
def test_half_precision_batchnorm_needs_one_of_two_settings(buffer_dtype, fp32, error):
    import conadv_ds
    from conadv_ds.bn import fp32_batchnorm
    from conadv_ds.errors import ConfigError
    from tests.common import make_model

    cfg = {"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "bf16": {"enabled": True},
           **({"data_types": {"buffer_dtype": buffer_dtype}} if buffer_dtype else {})}
    model = fp32_batchnorm(make_model()) if fp32 else make_model()
    with pytest.raises(ConfigError, match=error):
        conadv_ds.initialize(model=model, config=cfg)
