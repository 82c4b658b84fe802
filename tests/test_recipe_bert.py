"""BERT MLM pretraining with embedding-space ConAdv through `accelerate launch` on 2 CPU ranks:
DeepSpeed ZeRO-2, ZeRO-3 and plain DDP; δ checked against an attack written here from the
explicitly saved weights of the previous step."""

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.distributed import ROOT, free_port

RECIPE = ROOT / "recipes" / "bert_pretrain.py"
EPS, STEP = 1.0, 0.5  # ds_configs/bert_demo*.json


def accelerate(out, *launch_args, extra=()):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
           str(free_port()), *launch_args, str(RECIPE), "--max_steps", "4", "--log_interval", "2",
           "--output_dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    cfg = lambda name: str(ROOT / "ds_configs" / name)  # noqa: E731
    return d, {
        "zero2": accelerate(d / "z2", "--use_deepspeed", "--deepspeed_config_file", cfg("bert_demo.json"),
                            extra=("--record_deltas", "1")),
        "zero3": accelerate(d / "z3", "--use_deepspeed", "--deepspeed_config_file", cfg("bert_demo_zero3.json"),
                            extra=("--record_deltas", "3", "--dropout", "0", "--conadv", "clean_start_prob=1.0")),
        "ddp": accelerate(d / "ddp", "--multi_gpu", extra=("--deepspeed_config", cfg("bert_demo.json"),
                                                           "--record_deltas", "1")),
    }


@pytest.mark.parametrize("mode", ["zero2", "zero3", "ddp"])
def test_trains_and_reports_clean_and_adversarial_loss(runs, mode):
    out = runs[1][mode]
    steps = re.findall(r"step (\d)/4 loss ([\d.]+) clean_loss ([\d.]+) adv_loss ([\d.]+) lr ([\d.e-]+)", out)
    assert [s[0] for s in steps] == ["2", "4"]
    # WarmupPolyDecay, 10 warmup steps to 0.01, stepped once per optimizer step on every launcher
    assert [float(s[4]) for s in steps] == pytest.approx([0.002, 0.004])
    for _, loss, clean, adv, _ in steps:
        assert float(adv) > float(clean) > 0 and float(loss) == pytest.approx((float(clean) + float(adv)) / 2, abs=2e-4)
    m = re.search(r"eval final: mlm_loss ([\d.]+) masked_acc ([\d.]+) adv_mlm_loss ([\d.]+)", out)
    assert float(m.group(3)) > float(m.group(1)) > 0
    assert ("deepspeed on 2 ranks" if mode != "ddp" else "ddp on 2 ranks") in out
    assert re.search(r"weights_sha256=[0-9a-f]{64}", out)


@pytest.mark.parametrize("mode", ["zero2", "ddp"])
def test_ranks_see_different_data(runs, mode):
    folder = runs[0] / {"zero2": "z2", "ddp": "ddp"}[mode]
    ids = [torch.load(folder / f"deltas_rank{r}.pt", weights_only=False)["steps"][0]["batch"]["input_ids"]
           for r in (0, 1)]
    assert ids[0].shape == ids[1].shape and not torch.equal(ids[0], ids[1])


def reference_delta(config: dict, weights: list, batch: dict) -> torch.Tensor:
    """One L2 PGD step from δ = 0 (untargeted, FreeLB-style per-sequence norm), plain PyTorch."""
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(**config)).train()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    others = {k: v for k, v in batch.items() if k != "input_ids"}
    emb = model.get_input_embeddings()(batch["input_ids"]).detach()
    delta = torch.zeros_like(emb, requires_grad=True)
    loss = model(inputs_embeds=emb + delta * mask, **others).loss
    (g,) = torch.autograd.grad(loss, delta)
    g = g * mask
    delta = STEP * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
    return (delta * (EPS / norms).clamp(max=1.0) * mask).detach()


def test_delta_comes_from_the_previous_steps_weights(runs):
    rec = torch.load(runs[0] / "z3" / "deltas_rank0.pt", weights_only=False)
    assert len(rec["weights"]) == 3 and len(rec["steps"]) == 3
    for t in range(3):
        batch, delta = rec["steps"][t]["batch"], rec["steps"][t]["delta"]
        stale = reference_delta(rec["config"], rec["weights"][max(t - 1, 0)], batch)
        assert torch.allclose(delta, stale, atol=1e-5), t
        if t == 2:  # the live weights would have given another δ: staleness is real (lr is 0 at step 0)
            assert not all(torch.equal(a, b) for a, b in zip(rec["weights"][1], rec["weights"][2]))
            assert not torch.allclose(delta, reference_delta(rec["config"], rec["weights"][t], batch), atol=1e-5)


def test_padding_positions_get_zero_delta(runs):
    rec = torch.load(runs[0] / "z3" / "deltas_rank0.pt", weights_only=False)
    padded = 0
    for s in rec["steps"]:
        pad = s["batch"]["attention_mask"] == 0
        padded += int(pad.sum())
        assert (s["delta"][pad] == 0).all() and (s["delta"][~pad].abs().sum(-1) > 0).all()
    assert padded > 0


def test_offline_tokenizer_round_trips(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from conadv_ds.data import text

    corpus = text.embedded_corpus()
    tok = text.train_tokenizer(corpus[:400], 2000, tmp_path)
    sentence = "The import statement combines two operations; it searches for the named module."
    ids = tok(sentence)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded.split() and decoded.replace(" ", "") == sentence.lower().replace(" ", "")  # uncased, same text
    reloaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert reloaded(sentence)["input_ids"] == ids


def _dry_run(*args):
    cmd = [sys.executable, str(RECIPE), "--dry_run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_dry_run_validates_without_a_launcher():
    ok = _dry_run("--deepspeed_config", "ds_configs/bert_32k.json", "--world_size", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "train_batch_size 32768 = micro-batch 16 × gradient accumulation 1024 × world size 2" in ok.stdout
    bad = _dry_run("--deepspeed_config", "ds_configs/bert_32k.json", "--world_size", "3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == ("error: train_batch_size=32768: not divisible by train_micro_batch_size_per_gpu "
                                  "(16) × world size (3); allowed: multiples of 48")
    split = _dry_run("--deepspeed_config", "ds_configs/bert_demo.json", "--world_size", "2",
                     "--conadv", "schedule=split")
    assert split.returncode == 2 and split.stderr.count("\n") == 1
    assert split.stderr.startswith("error: conadv.schedule='split': this recipe runs clean, disadv and conadv")
