"""BERT MLM pretraining with embedding-space ConAdv through `accelerate launch` on 2 CPU ranks:
DeepSpeed ZeRO-2, ZeRO-3 and plain DDP; δ checked against an attack written here from the
explicitly saved weights two steps old (ZeRO-3, τ = 2); a run killed with SIGKILL after a
checkpoint and resumed ends with the weights of an uninterrupted run; the user's accelerate YAML
configures DeepSpeed beside the JSON."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.distributed import ROOT, free_port

RECIPE = ROOT / "recipes" / "bert_pretrain.py"
EPS, STEP = 1.0, 0.5  # ds_configs/bert_demo*.json
STEPS = 6
cfg = lambda name: str(ROOT / "ds_configs" / name)  # noqa: E731


def per_rank_demo_config(path, **fields):
    """`ds_configs/bert_demo.json` without its train_batch_size (the batch is then micro-batch ×
    accumulation × the ranks that train), with `fields` set, written to `path`."""
    config = json.loads((ROOT / "ds_configs" / "bert_demo.json").read_text())
    del config["train_batch_size"]
    config.update(fields)
    path.write_text(json.dumps(config))
    return path
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tokenizer for every run (built once, not per run) and one datasets cache."""
    from conadv_ds.data import text

    d = tmp_path_factory.mktemp("bert_shared")
    text.train_tokenizer(text.embedded_corpus(), 3000, d / "tokenizer")
    return ("--tokenizer_dir", str(d / "tokenizer"), "--cache_dir", str(d / "cache"))


def command(out, launch_args, extra, config_file=None, processes=2):
    head = ["--config_file", str(config_file)] if config_file else ["--num_processes", str(processes)]
    return [sys.executable, "-m", "accelerate.commands.launch", *head, "--main_process_port", str(free_port()),
            *launch_args, str(RECIPE), "--max_steps", str(STEPS), "--log_interval", "2", "--save_interval", "2",
            "--output_dir", str(out), *extra]


def accelerate(out, *launch_args, extra=(), config_file=None, check=True, processes=2):
    proc = subprocess.run(command(out, launch_args, extra, config_file, processes), capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout
    return proc


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    """Launch arguments and recipe flags per mode. ZeRO-3 runs `bert_demo_zero3.json` with the
    warmup starting at lr 0.001 instead of 0, so that the weights move from the first step
    (w_1 ≠ w_0) and a snapshot never refreshed after step 0 gives another δ; it records all 6 steps
    (at τ = 2, steps 4 and 5 are those where w_{t-2}, w_{t-3}, w_{t-1} and w_0 all differ)."""
    config = json.loads((ROOT / "ds_configs" / "bert_demo_zero3.json").read_text())
    config["scheduler"]["params"]["warmup_min_lr"] = 0.001
    zero3 = tmp_path_factory.mktemp("bert_zero3") / "bert_demo_zero3_warm.json"
    zero3.write_text(json.dumps(config))
    return {
        "zero2": (("--use_deepspeed", "--deepspeed_config_file", cfg("bert_demo.json")), ("--record_deltas", "1")),
        "zero3": (("--use_deepspeed", "--deepspeed_config_file", str(zero3)),
                  ("--record_deltas", str(STEPS), "--dropout", "0", "--conadv", "clean_start_prob=1.0",
                   "--conadv", "staleness=2")),
        "ddp": (("--multi_gpu",), ("--deepspeed_config", cfg("bert_demo.json"), "--record_deltas", "1")),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared, modes):
    d = tmp_path_factory.mktemp("bert")
    return d, {mode: accelerate(d / mode, *launch, extra=(*flags, *shared)) for mode, (launch, flags) in modes.items()}


# WarmupPolyDecay, 10 warmup steps to 0.01 (from 0, or from 0.001 under ZeRO-3), stepped once per
# optimizer step on every launcher: the lr logged after steps 2, 4 and 6
LOGGED_LR = {"zero2": [0.002, 0.004, 0.006], "zero3": [0.0028, 0.0046, 0.0064], "ddp": [0.002, 0.004, 0.006]}


@pytest.mark.parametrize("mode", ["zero2", "zero3", "ddp"])
def test_trains_and_reports_clean_and_adversarial_loss(runs, mode):
    out = runs[1][mode]
    steps = re.findall(r"step (\d)/6 loss ([\d.]+) clean_loss ([\d.]+) adv_loss ([\d.]+) lr ([\d.e-]+)", out)
    assert [s[0] for s in steps] == ["2", "4", "6"]
    assert [float(s[4]) for s in steps] == pytest.approx(LOGGED_LR[mode])
    for _, loss, clean, adv, _ in steps:
        assert float(adv) > float(clean) > 0 and float(loss) == pytest.approx((float(clean) + float(adv)) / 2, abs=2e-4)
    m = re.search(r"eval final: mlm_loss ([\d.]+) masked_acc ([\d.]+) adv_mlm_loss ([\d.]+)", out)
    assert float(m.group(3)) > float(m.group(1)) > 0
    assert ("deepspeed on 2 ranks" if mode != "ddp" else "ddp on 2 ranks") in out
    assert re.search(r"weights_sha256=[0-9a-f]{64}", out)


def test_ddp_averages_gradients_as_zero2_does(runs):
    """Same JSON, data and seeds: plain DDP must follow ZeRO-2's losses (ranks that never
    all-reduce would each follow their own half of the data). Not bit for bit: the two reduce
    gradients in different orders, and LAMB's normalised update turns those last-bit differences
    on near-zero bias gradients into ~1e-3 weight differences (eval loss apart by up to 2e-4)."""
    losses = {m: [float(x) for x in re.findall(r"step \d/6 loss ([\d.]+)", runs[1][m])] for m in ("zero2", "ddp")}
    evals = {m: float(re.search(r"eval final: mlm_loss ([\d.]+)", runs[1][m]).group(1)) for m in ("zero2", "ddp")}
    assert losses["ddp"] == pytest.approx(losses["zero2"], abs=5e-4) and len(losses["ddp"]) == 3
    assert evals["ddp"] == pytest.approx(evals["zero2"], abs=1e-3)
    from safetensors.torch import load_file

    final = {m: load_file(runs[0] / m / "model" / "model.safetensors") for m in ("zero2", "ddp")}
    step2 = load_file(runs[0] / "ddp" / "checkpoints" / "step2" / "model.safetensors")
    apart = lambda a, b: sum(float((a[k] - b[k]).double().norm()) ** 2 for k in a) ** 0.5  # noqa: E731
    assert apart(final["ddp"], final["zero2"]) < 0.1 * apart(final["ddp"], step2)  # measured 0.03 × 0.85


@pytest.mark.parametrize("mode", ["zero2", "ddp"])
def test_ranks_see_different_data(runs, mode):
    folder = runs[0] / mode
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


def assert_delta_from_the_weights_tau_steps_old(config: dict, weights: list, steps: list, tau: int) -> None:
    """`weights[t]`: the full weights step t started from; `steps[t]`: (its batch, its δ). Every
    δ_t equals `reference_delta` on w_{max(t-τ, 0)} and differs from it on each of w_{t-τ-1},
    w_{t-τ+1} and w_0 that is another version: a snapshot one step off either way, or one never
    refreshed after step 0, gives another δ. The weights must all differ (a non-zero lr from the
    first step), and there must be two steps at which those four versions are all distinct."""
    assert len(steps) == len(weights) >= tau + 4
    for i in range(len(weights)):
        for j in range(i):
            assert not all(torch.equal(a, b) for a, b in zip(weights[i], weights[j])), (i, j)
    for t, (batch, delta) in enumerate(steps):
        source = max(t - tau, 0)
        assert torch.allclose(delta, reference_delta(config, weights[source], batch), atol=1e-5), t
        for other in {t - tau - 1, t - tau + 1, 0} - {source}:
            if other >= 0:
                stale = reference_delta(config, weights[other], batch)
                assert not torch.allclose(delta, stale, atol=1e-5), (t, other)


def test_delta_comes_from_the_weights_two_steps_old(runs):
    """ZeRO-3, staleness 2, lr 0.001 at the first step: δ_t from w_{max(t-2, 0)}, and not from the
    weights one step newer or older, nor from w_0."""
    rec = torch.load(runs[0] / "zero3" / "deltas_rank0.pt", weights_only=False)
    assert rec["conadv"]["staleness"] == 2
    steps = [(s["batch"], s["delta"]) for s in rec["steps"]]
    assert_delta_from_the_weights_tau_steps_old(rec["config"], rec["weights"], steps, tau=2)


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


def _dry_run(*args, env=None):
    cmd = [sys.executable, str(RECIPE), "--dry_run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_dry_run_validates_without_a_launcher():
    ok = _dry_run("--deepspeed_config", "ds_configs/bert_32k.json", "--world_size", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "train_batch_size 32768 = micro-batch 16 × gradient accumulation 1024 × world size 2" in ok.stdout
    bad = _dry_run("--deepspeed_config", "ds_configs/bert_32k.json", "--world_size", "3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == ("error: train_batch_size=32768: not divisible by train_micro_batch_size_per_gpu "
                                  "(16) × world size (3); allowed: multiples of 48")
    split = _dry_run("--deepspeed_config", "ds_configs/bert_demo.json", "--world_size", "3",
                     "--conadv", "schedule=split")  # 2 trainers + 1 attacker
    assert split.returncode == 2 and split.stderr.count("\n") == 1
    assert split.stderr.startswith("error: conadv.schedule='split': needs DeepSpeed (accelerate launch "
                                   "--use_deepspeed)")


def killed_after_checkpoint(out, launch_args, extra, tag):
    """Start the run; as soon as checkpoint `tag` is published, SIGKILL the launcher and its ranks
    (which torch's elastic agent starts in sessions of their own)."""
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command(out, launch_args, extra), stdout=sink, stderr=subprocess.STDOUT, text=True,
                                env=ENV, cwd=ROOT)
        latest, deadline = out / "checkpoints" / "latest", time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (
                latest.is_file() and latest.read_text() == tag):
            time.sleep(0.02)
        launcher = psutil.Process(proc.pid)
        for p in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        proc.wait()
    assert latest.is_file() and latest.read_text() == tag, log.read_text()[-3000:]
    return log.read_text()


KILLED_AT = {"zero2": "step2", "zero3": "step4"}


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_killed_and_resumed_run_ends_bit_identical(runs, modes, shared, tmp_path, mode):
    """ZeRO-2 at staleness 1 (one old step in flight: lookahead's pending batches), killed after
    step 2, and ZeRO-3 at staleness 2 (snapshots of sharded w_2 and w_3, which differ), killed
    after step 4; the reference is the `runs` fixture's uninterrupted run with the same flags."""
    launch, flags = modes[mode]
    flags = (*flags, *shared)
    reference = runs[1][mode]
    died = killed_after_checkpoint(tmp_path / "run", launch, flags, KILLED_AT[mode])
    assert "weights_sha256" not in died
    resumed = accelerate(tmp_path / "run", *launch, extra=(*flags, "--resume"))
    assert re.search(rf"resumed from .*checkpoints/{KILLED_AT[mode]}\n", resumed)
    sha = lambda out: re.findall(r"weights_sha256=([0-9a-f]{64})", out)  # noqa: E731
    assert sha(resumed) == sha(reference) and len(sha(reference)) == 1
    saved = (tmp_path / "run" / "checkpoints" / "checkpoints").read_text().split()
    assert saved == ["step2", "step4", "step6"] and (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step6"


YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  gradient_accumulation_steps: 2
  gradient_clipping: 0.5
  offload_optimizer_device: cpu
  offload_param_device: none
  zero3_init_flag: true
mixed_precision: bf16
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: false
"""


def test_accelerate_yaml_config_is_the_configuration(shared, tmp_path):
    ours = json.loads((ROOT / "ds_configs" / "bert_demo.json").read_text())
    del ours["zero_optimization"], ours["gradient_accumulation_steps"], ours["gradient_clipping"]
    ours.update(train_batch_size=64, zero_force_ds_cpu_optimizer=False)  # micro 16 × accumulation 2 × 2 ranks
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    (tmp_path / "cfg.yaml").write_text(YAML)
    out = accelerate(tmp_path / "out", config_file=tmp_path / "cfg.yaml",
                     extra=("--deepspeed_config", str(tmp_path / "ours.json"), *shared))
    assert re.search(r"step 6/6 loss [\d.]+ clean_loss [\d.]+ adv_loss [\d.]+ lr 0.006 ", out)  # ours: LAMB, schedule
    states = tmp_path / "out" / "checkpoints" / "step6" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    ran = torch.load(states, map_location="cpu", weights_only=False)["ds_config"]  # what DeepSpeed ran with
    assert ran["zero_optimization"]["stage"] == 3 and ran["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ran["gradient_accumulation_steps"] == 2 and ran["gradient_clipping"] == 0.5
    assert ran["bf16"]["enabled"] is True and ran["train_batch_size"] == 64 and "optimizer" not in ran
    assert ran["timers"] == {"throughput": {"enabled": False}}  # no device sync at every forward



def test_a_value_set_in_the_yaml_and_the_json_differently_is_one_line():
    """What `accelerate launch --config_file` exports for the YAML above (zero_stage: 3) against a
    JSON that says stage 2: the recipe's one line, before anything starts."""
    ours = json.loads((ROOT / "ds_configs" / "bert_demo.json").read_text())
    assert ours["zero_optimization"]["stage"] == 2
    bad = _dry_run("--deepspeed_config", "ds_configs/bert_demo.json",
                   env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr[-2000:]
    assert bad.stderr == ("error: zero_stage=3 in the accelerate config but zero_optimization.stage=2 in "
                          "ds_configs/bert_demo.json; set it in one place\n")


def test_split_for_text_matches_in_process_conadv(shared, tmp_path):
    """1 trainer + 1 attacker under `accelerate launch`: the attacker computes δ in embedding space
    from the trainer's w_{t-1} while it trains; every δ, every logged loss and the final weights
    equal in-process ConAdv's (τ = 1, same seeds) on the trainer alone."""
    path = per_rank_demo_config(tmp_path / "one_trainer.json")  # micro-batch 16 × accumulation 1 × the one trainer
    launch = ("--use_deepspeed", "--deepspeed_config_file", str(path))
    flags = (*shared, "--record_deltas", "3")
    split = accelerate(tmp_path / "split", *launch, extra=(*flags, "--conadv", "schedule=split",
                                                           "--conadv", "attacker_ranks=1"))
    inproc = accelerate(tmp_path / "inproc", *launch, extra=flags, processes=1)
    logged = lambda out: re.findall(r"step \d+/\d+ loss .* lr \S+", out)  # noqa: E731
    assert len(logged(split)) == STEPS // 2 and logged(split) == logged(inproc)
    sha = lambda out: re.findall(r"weights_sha256=([0-9a-f]{64})", out)  # noqa: E731
    assert len(sha(split)) == 1 and sha(split) == sha(inproc)
    a, b = (torch.load(tmp_path / run / "deltas_rank0.pt", weights_only=False)["steps"] for run in ("split", "inproc"))
    assert len(a) == 3 and all(torch.equal(x["delta"], y["delta"]) for x, y in zip(a, b))
    assert all(x["delta"].abs().sum() > 0 for x in a[1:])


def test_accelerate_default_accumulation_leaves_a_derived_one():
    """`accelerate config` writes gradient_accumulation_steps 1 unless asked; a JSON that derives
    it from train_batch_size and the micro-batch (32768 / (16 × 64) = 32) keeps its own, while an
    accumulation the user did choose still has to agree."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import bert_pretrain

    from conadv_ds.errors import ConfigError
    from conadv_ds.resolve import resolve_config

    raw = json.loads((ROOT / "ds_configs" / "bert_32k.json").read_text())
    bert_pretrain.merge_accelerate_config(raw, "bert_32k.json", env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
                                                                      "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert resolve_config(raw, None, 64).batch.gradient_accumulation_steps == 32
    chosen = json.loads((ROOT / "ds_configs" / "bert_32k.json").read_text())
    bert_pretrain.merge_accelerate_config(chosen, "bert_32k.json", env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    with pytest.raises(ConfigError, match="train_batch_size=32768: must equal"):
        resolve_config(chosen, None, 64)


@pytest.mark.parametrize("phase2_steps", [1, 0])
def test_a_second_phase_too_long_for_the_corpus_is_one_line(tmp_path, capsys, phase2_steps):
    """The embedded corpus packs into about 14 sequences of 8192 tokens, fewer than one step's 16:
    a second phase of that length is refused before the model is built (its stream would divide
    by zero); with no steps there is no second phase, and the run trains."""
    import runpy

    config = per_rank_demo_config(tmp_path / "c.json", train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    main = runpy.run_path(str(RECIPE))["main"]
    args = ["--deepspeed_config", str(config), "--max_steps", "2", "--phase2_seq_length", "8192",
            "--phase2_steps", str(phase2_steps), "--output_dir", str(tmp_path / "out")]
    if not phase2_steps:
        main(args)
        assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "step2"
        return
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    m = re.fullmatch(r"error: train_batch_size=16 is larger than the corpus \((\d+) sequences of 8192 tokens\); point "
                     r"--train_files or --dataset_dir at a bigger corpus, or use ds_configs/bert_demo\.json", err)
    assert m and int(m.group(1)) < 16, err
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("args,expected", [
    (("--phase2_steps", "5"), "error: --phase2_steps=5: needs --phase2_seq_length (or recipe.phase2_seq_length)"),
    (("--max_steps", "10", "--phase2_seq_length", "256", "--phase2_steps", "11"),
     "error: --phase2_steps=11: must be <= max_steps (10)"),
])
def test_bad_second_phase_is_one_line(args, expected):
    bad = _dry_run("--deepspeed_config", "ds_configs/bert_demo.json", *args)
    assert bad.returncode == 2 and bad.stderr.strip() == expected, bad.stderr[-2000:]


def test_two_fresh_runs_build_one_tokenizer_and_end_with_one_model(tmp_path):
    """The README's command run twice from scratch in two folders (each builds its own tokenizer
    from the corpus, in a process with its own hash seed, into its own datasets cache) ends with
    the same tokenizer and the same weights."""
    runs, config = [], per_rank_demo_config(tmp_path / "ds.json")
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = subprocess.run([sys.executable, str(RECIPE), "--deepspeed_config", str(config),
                               "--max_steps", "3", "--log_interval", "3", "--output_dir", str(out),
                               "--cache_dir", str(tmp_path / f"cache{i}")], capture_output=True, text=True,
                              env={**ENV, "PYTHONHASHSEED": str(i + 1)}, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        sha = re.search(r"weights_sha256=([0-9a-f]{64})", proc.stdout).group(1)
        runs.append(((out / "tokenizer" / "tokenizer.json").read_bytes(), sha))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
