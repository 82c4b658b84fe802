"""The one micro-step objective: its loss and statistics against plain PyTorch, the device-side
step metrics against a hand computation, and every front end (ConAdvEngine, ConAdvTrainer, the
BERT recipe) going through it."""

import json
import runpy

import pytest
import torch
import torch.nn.functional as F

from conadv_ds.objective import Objective, StepMetrics
from conadv_ds.perturb import PixelSpace
from tests.common import make_model
from tests.distributed import ROOT, launch


def forward_of(model):
    def forward(batch):
        out = model(batch[0])
        return F.cross_entropy(out, batch[1]), out
    return forward


@pytest.mark.parametrize("lam", [0.5, 1 / 3, 1.0])
def test_loss_and_statistics_match_plain_pytorch(lam):
    torch.manual_seed(0)
    model = make_model().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    delta = 0.1 * torch.randn_like(x)
    step = Objective(PixelSpace(), lam)(forward_of(model), (x, y), delta)
    clean_logits, adv_logits = model(x), model(x + delta)
    clean, adv = F.cross_entropy(clean_logits, y), F.cross_entropy(adv_logits, y)
    expected = adv if lam == 1 else (1 - lam) * clean + lam * adv
    assert torch.allclose(step.loss, expected, atol=1e-6)
    (g,) = torch.autograd.grad(step.loss, model.fc.weight)
    (g_ref,) = torch.autograd.grad(expected, model.fc.weight)
    assert torch.allclose(g, g_ref, atol=1e-6)
    s = step.stats
    assert torch.allclose(s.adv_loss, adv) and int(s.adv_correct) == int((adv_logits.argmax(1) == y).sum())
    assert int(s.adv_counted) == 8
    if lam < 1:
        assert torch.allclose(s.clean_loss, clean) and int(s.correct) == int((clean_logits.argmax(1) == y).sum())
    else:
        assert s.clean_loss is None and int(s.counted) == 0


def test_no_delta_is_the_plain_loss():
    model = make_model().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    step = Objective(PixelSpace(), 0.5)(forward_of(model), (x, y), None)
    assert torch.equal(step.loss, F.cross_entropy(model(x), y)) and step.stats.adv_loss is None


def test_only_the_first_block_is_attacked_with_parts():
    model = make_model().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    delta = 0.1 * torch.randn(4, 1, 8, 8)
    step = Objective(PixelSpace(parts=2), 1 / 3)(forward_of(model), (x, y), delta)
    expected = 2 / 3 * F.cross_entropy(model(x), y) + 1 / 3 * F.cross_entropy(model(x[:4] + delta), y[:4])
    assert torch.allclose(step.loss, expected, atol=1e-6) and int(step.stats.adv_counted) == 4


def test_step_metrics_average_over_micro_batches():
    model = make_model().train()
    objective, metrics, rows = Objective(PixelSpace(), 0.5), StepMetrics(), []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        s = objective(forward_of(model), (x, y), torch.full_like(x, 0.05)).stats
        metrics.add(s)
        rows.append((float(s.loss), float(s.clean_loss), float(s.adv_loss), int(s.correct), int(s.adv_correct)))
    m = metrics.read()
    assert m["loss"] == pytest.approx(sum(r[0] for r in rows) / 3)
    assert m["clean_loss"] == pytest.approx(sum(r[1] for r in rows) / 3)
    assert m["adv_loss"] == pytest.approx(sum(r[2] for r in rows) / 3)
    assert m["accuracy"] == pytest.approx(sum(r[3] for r in rows) / 24)
    assert m["adv_accuracy"] == pytest.approx(sum(r[4] for r in rows) / 24)
    assert metrics.read() == {}  # read resets


class Counting:
    """Wraps Objective.__call__ and counts the calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = Objective.__call__

        def counted(obj, *args, **kwargs):
            self.calls += 1
            return original(obj, *args, **kwargs)

        monkeypatch.setattr(Objective, "__call__", counted)


def test_the_trainer_goes_through_the_objective(tmp_path, monkeypatch):
    from tests.test_hf_trainer import trainer_for

    counting = Counting(monkeypatch)
    trainer_for("bert-mlm", tmp_path, max_steps=3, gradient_accumulation_steps=2).train()
    assert counting.calls == 6


def test_the_bert_recipe_goes_through_the_objective(tmp_path, monkeypatch):
    from tests.test_recipe_bert import per_rank_demo_config

    counting = Counting(monkeypatch)
    config = per_rank_demo_config(tmp_path / "c.json", train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    main = runpy.run_path(str(ROOT / "recipes" / "bert_pretrain.py"))["main"]
    main(["--deepspeed_config", str(config), "--max_steps", "2", "--output_dir", str(tmp_path / "out")])
    assert counting.calls == 2 * 2


def test_the_bert_recipe_reads_its_statistics_once_per_step(tmp_path):
    """Host reads during the recipe's `main` (3 steps, logged every step, then the final
    evaluation), outside the model's own forward (transformers' sdpa mask check reads once per
    forward) and the final weights' fingerprint (once per run): the same at gradient
    accumulation 1 and 4, three of them the per-step metrics; no device synchronisation."""
    from tests.common import counting_host_syncs
    from tests.test_recipe_bert import per_rank_demo_config

    main = runpy.run_path(str(ROOT / "recipes" / "bert_pretrain.py"))["main"]

    def syncs(ga: int):
        config = per_rank_demo_config(tmp_path / f"ga{ga}.json", train_micro_batch_size_per_gpu=4,
                                      gradient_accumulation_steps=ga)
        with counting_host_syncs(outside=("transformers/models", "transformers/masking_utils",
                                          "conadv_ds/fingerprint.py")) as count:
            main(["--deepspeed_config", str(config), "--max_steps", "3", "--log_interval", "1",
                  "--output_dir", str(tmp_path / f"out{ga}")])
        return count

    counts = [syncs(1), syncs(4)]
    assert counts[0].count == counts[1].count and 3 <= counts[0].count <= 6, [c.calls for c in counts]
    assert counts[0].device_syncs == counts[1].device_syncs == 0, [c.calls for c in counts]


def test_the_engine_goes_through_the_objective(tmp_path):
    launch("objective_worker.py", "--out", str(tmp_path), nproc=1)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["calls"] == result["steps"] * result["gas"] == 6
    # AutoAugment views (a space of 2 parts) with aux_bn get their own BatchNorm branch; plain runs do not
    assert result["aa_branch"] and not result["plain_adv_branch_only"]


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    d = tmp_path_factory.mktemp("sync")
    launch("sync_worker.py", "--out", str(d))
    return json.loads((d / "result.json").read_text())


def test_one_host_sync_per_step_and_collectives_on_the_device(synced):
    """Statistics stay on the device across micro-batches: ConAdv adds the same number of host
    reads per optimizer step at gradient accumulation 1 and 4 (at most one: the metrics read) and
    makes no device synchronisation at all, where DeepSpeed's own loop makes some (its throughput
    timer: the counter sees them); and every tensor handed to a collective during training and
    evaluation lives on the engine's device."""
    r = synced
    extra = {gas: r[f"ours_gas{gas}"]["reads"] - r[f"raw_gas{gas}"]["reads"] for gas in (1, 4)}
    assert extra[1] == extra[4] and extra[1] <= 1, r
    assert r["ours_gas1"]["device"] == r["ours_gas4"]["device"] == 0, r
    assert r["raw_gas1"]["device"] > 0 and r["raw_gas4"]["device"] > r["raw_gas1"]["device"], r
    assert r["collective_devices"] == [r["engine_device"]], r


def test_the_trainer_under_deepspeed_makes_no_device_sync(synced):
    """The ConAdvTrainer under DeepSpeed ZeRO-2 (2 ranks): no device synchronisation in the whole
    `train()`, and host reads beyond the plain Trainer's the same at gradient accumulation 1 and 4
    (one per log); the plain Trainer's DeepSpeed run synchronizes more often at 4 than at 1 (its
    throughput timer, at every forward: the counter sees them)."""
    t = synced["trainer"]
    assert t["ours_gas1"]["device"] == t["ours_gas4"]["device"] == 0, t
    assert t["plain_gas4"]["device"] > t["plain_gas1"]["device"] > 0, t
    extra = {gas: t[f"ours_gas{gas}"]["reads"] - t[f"plain_gas{gas}"]["reads"] for gas in (1, 4)}
    assert extra[1] == extra[4] <= 2, t


def test_zero3_evaluation_on_uneven_shards(synced):
    """33 images on 2 ranks under ZeRO-3: no hang (the launch would time out), every image counted
    once and the padding not at all, the same accuracy as a plain copy of the model."""
    uneven = synced["uneven_zero3"]
    assert uneven["batches_per_rank"] == 3 and uneven["ours"]["n"] == 33
    assert uneven["ours"]["top1"] * 33 == pytest.approx(uneven["plain_top1"])  # counts of correct images
    assert uneven["ours"]["top5"] * 33 == pytest.approx(uneven["plain_top5"])
    assert uneven["ours"]["robust_top1"] <= uneven["ours"]["top1"]


def _with_branch(model, attr):
    """A copy of `model` whose every BatchNorm is replaced by its `attr` copy (plain PyTorch)."""
    import copy

    from torch.nn.modules.batchnorm import _BatchNorm

    clone = copy.deepcopy(model)
    for m in list(clone.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, _BatchNorm) and hasattr(child, attr):
                plain = copy.deepcopy(getattr(child, attr))
                setattr(m, child_name, plain)
    return clone


def test_autoaugment_batch_has_three_branches_each_a_third():
    """The official ConAdv+AA batch: clean, AutoAugment and adversarial copies of the same images,
    each 1/3 of the loss; clean through the main BatchNorm, AutoAugment through its own branch,
    adversarial through the adversarial branch; each branch's running statistics see only its part;
    evaluation uses the main branch."""
    import copy

    from conadv_ds.bn import convert_aux_bn

    torch.manual_seed(0)
    model = convert_aux_bn(make_model(), augmented=True).train()
    x, aa, y = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    delta = 0.1 * torch.randn_like(x)
    before = copy.deepcopy(model)
    step = Objective(PixelSpace(parts=2), 1 / 3, model, aux_bn=True)(forward_of(model), (torch.cat([x, aa]),
                                                                                          torch.cat([y, y])), delta)
    main, aug, adv = _with_branch(before, "missing"), _with_branch(before, "aux_aa"), _with_branch(before, "aux")
    parts = [F.cross_entropy(main(x), y), F.cross_entropy(aug(aa), y), F.cross_entropy(adv(x + delta), y)]
    assert torch.allclose(step.loss, sum(parts) / 3, atol=1e-6)
    assert torch.allclose(step.stats.clean_loss, (parts[0] + parts[1]) / 2, atol=1e-6)
    # running statistics: main saw the clean images only, aux_aa the AutoAugment views, aux the adversarial copy
    assert torch.allclose(model.bn1.running_mean, main.bn1.running_mean)
    assert torch.allclose(model.bn1.aux_aa.running_mean, aug.bn1.running_mean)
    assert torch.allclose(model.bn1.aux.running_mean, adv.bn1.running_mean)
    model.eval()
    main.eval()
    assert torch.allclose(model(x), main(x), atol=1e-6)  # evaluation: the main branch


def test_collectives_only_in_the_reduction_helper_and_the_split_transport():
    """Every tensor the package hands to a collective goes through reduce.py (on the device) or the
    split transport (gloo side group, CPU tensors by design); stale.py only asks DeepSpeed to
    re-gather its own partitions, and barriers carry no tensor."""
    import re

    pattern = re.compile(r"\b(all_reduce|all_gather\w*|reduce_scatter\w*|broadcast|isend|irecv)\(|\.(send|recv)\(")
    allowed = {"reduce.py", "stale.py"}
    offenders = []
    for path in sorted((ROOT / "conadv_ds").rglob("*.py")):
        rel = path.relative_to(ROOT / "conadv_ds")
        if rel.parts[0] == "split" or str(rel) in allowed:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []
