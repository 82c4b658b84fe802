"""ConAdvTrainer on tiny models built from configs: BERT MLM, a sequence classifier, GPT-2 and a
ViT image classifier; staleness against explicitly kept weights; exact resume; config sources."""

import copy
import json

import pytest
import torch
from transformers import TrainerCallback

from conadv_ds.adversary import Adversary
from conadv_ds.batch import default_loss
from conadv_ds.errors import ConfigError
from conadv_ds.hf import ConAdvTrainer, ConAdvTrainingArguments, merge_conadv
from conadv_ds.perturb import EmbeddingSpace

TEXT = {"norm": "l2", "epsilon": 1.0, "step_size": 0.5, "targeted": False, "clean_start_prob": 0.5}


def text_data(n=32, length=12, vocab=50, labels="tokens"):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(5, vocab, (length,), generator=g)
        mask = torch.ones(length, dtype=torch.long)
        mask[length - 1 - i % 4:] = 0
        lab = ids.masked_fill(mask == 0, -100) if labels == "tokens" else torch.tensor(i % 3)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": lab})
    return rows


def models():
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        ViTConfig,
        ViTForImageClassification,
    )

    bert = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16)
    g = torch.Generator().manual_seed(1)
    images = [{"pixel_values": torch.rand(3, 16, 16, generator=g), "labels": torch.tensor(i % 4)} for i in range(32)]
    return {
        "bert-mlm": (lambda: BertForMaskedLM(BertConfig(**bert)), text_data(), {**TEXT, "space": "embedding"}),
        "bert-classifier": (lambda: BertForSequenceClassification(BertConfig(**bert, num_labels=3)),
                            text_data(labels="class"), {**TEXT, "targeted": True}),
        "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)),
                 text_data(), TEXT),
        "vit": (lambda: ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=32, num_labels=4)),
                images, {"epsilon": 8 / 255, "step_size": 4 / 255, "steps": 2}),
    }


def trainer_for(name, out, conadv_extra=None, **kw):
    make, data, block = models()[name]
    torch.manual_seed(0)
    args = ConAdvTrainingArguments(str(out), per_device_train_batch_size=4, max_steps=kw.pop("max_steps", 4),
                                   logging_steps=2, report_to=[], use_cpu=True, seed=0, learning_rate=5e-3,
                                   conadv={**block, **(conadv_extra or {})}, **{"save_strategy": "no", **kw})
    return ConAdvTrainer(model=make(), args=args, train_dataset=data)


@pytest.mark.parametrize("name", ["bert-mlm", "bert-classifier", "gpt2", "vit"])
def test_trains_and_logs_clean_and_adversarial_loss(tmp_path, name):
    trainer = trainer_for(name, tmp_path)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "clean_loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert h["adv_loss"] > h["clean_loss"] > 0
    expected = "PixelSpace" if name == "vit" else "EmbeddingSpace"
    assert type(trainer._objective.space).__name__ == expected


class Recorder(TrainerCallback):
    """Keeps a full copy of the weights at the start of every step."""

    def __init__(self):
        self.weights = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.weights.append(copy.deepcopy(model.state_dict()))


@pytest.mark.parametrize("tau", [1, 2])
def test_delta_comes_from_weights_tau_steps_old(tmp_path, tau):
    trainer = trainer_for("bert-mlm", tmp_path, {"staleness": tau}, gradient_accumulation_steps=2, max_steps=5)
    rec, seen = Recorder(), []
    trainer.add_callback(rec)
    original = trainer._delta

    def recording(inputs):
        delta = original(inputs)
        seen.append((trainer.state.global_step, trainer._micro[1] - 1, {k: v.clone() for k, v in inputs.items()},
                     delta.clone()))
        return delta

    trainer._delta = recording
    trainer.train()
    assert len(seen) == 10
    make = models()["bert-mlm"][0]
    for step, micro, inputs, delta in seen:
        old = make()
        old.load_state_dict(rec.weights[max(step - tau, 0)])
        old.train()
        adversary = Adversary(old, EmbeddingSpace().bind(old), trainer.conadv, default_loss, rank=0)
        assert torch.allclose(adversary(inputs, step, micro), delta, atol=1e-6), (step, micro)
        if step >= tau + 1:  # weights moved: the live ones would have given another δ
            live = make()
            live.load_state_dict(rec.weights[step])
            live.train()
            other = Adversary(live, EmbeddingSpace().bind(live), trainer.conadv, default_loss, rank=0)(inputs, step, micro)
            assert not torch.allclose(other, delta, atol=1e-6)
    # without DeepSpeed a snapshot is a full copy of the weights and buffers, and τ of them are kept
    module = trainer.model
    one_copy = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    assert trainer._schedule.extra_bytes() == tau * one_copy


def test_resume_from_checkpoint_is_exact(tmp_path):
    straight = trainer_for("bert-mlm", tmp_path / "a", {"staleness": 2}, save_strategy="steps", save_steps=2)
    straight.train()
    assert (tmp_path / "a" / "checkpoint-2" / "conadv_state_rank0.pt").is_file()
    resumed = trainer_for("bert-mlm", tmp_path / "b", {"staleness": 2})
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (n, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    assert [h["adv_loss"] for h in resumed.state.log_history if "adv_loss" in h][-1] == \
        [h["adv_loss"] for h in straight.state.log_history if "adv_loss" in h][-1]


def test_conadv_sources(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 8, "conadv": {"epsilon": 0.5, "steps": 2}}))
    assert merge_conadv(None, str(ds)).epsilon == 0.5
    merged = merge_conadv({"norm": "l2", "steps": 2}, str(ds))
    assert merged.norm == "l2" and merged.epsilon == 0.5 and merged.steps == 2
    with pytest.raises(ConfigError, match=r"conadv.epsilon: 0.1 in the conadv argument but 0.5 in the DeepSpeed"):
        merge_conadv({"epsilon": 0.1}, str(ds))
    with pytest.raises(ConfigError, match="conadv.stepz: unknown key"):
        merge_conadv({"stepz": 1}, None)
    assert not merge_conadv(None, None).enabled
    with pytest.raises(ConfigError, match=r"^conadv.schedule='split': the Trainer runs 'disadv' and 'conadv'"):
        ConAdvTrainingArguments(output_dir=str(tmp_path / "out"), conadv={"schedule": "split"}, report_to=[])


@pytest.fixture(scope="module")
def two_rank_deepspeed(tmp_path_factory):
    from tests.distributed import launch

    out = tmp_path_factory.mktemp("hf_deepspeed")
    launch("hf_worker.py", "--out", str(out), "--stages", "2", "3")
    return torch.load(out / "result.pt", weights_only=False)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_deepspeed(two_rank_deepspeed, stage):
    """The Trainer's DeepSpeed integration on 2 ranks: logged loss parts are the mean over ranks of
    every rank's own, ≡ the plain Trainer when the attack vanishes (GA 2), and
    resume_from_checkpoint continues exactly for τ = 1, 2."""
    result = two_rank_deepspeed[stage]
    assert result["world"] == 2 and result["deepspeed"]
    logs = [h for h in result["log"] if "clean_loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6] and all(h["adv_loss"] > h["clean_loss"] for h in logs)
    # each log covers 2 steps of one micro-batch per rank; the ranks' own values differ, so a sum
    # or one rank's mean would not match
    per_rank = torch.tensor(result["losses"], dtype=torch.float64)  # rank, micro-batch, (clean, adv)
    assert per_rank.shape == (2, 6, 2)
    for i, h in enumerate(logs):
        window = per_rank[:, 2 * i:2 * i + 2]
        assert [h["clean_loss"], h["adv_loss"]] == pytest.approx(window.mean(dim=(0, 1)).tolist(), abs=2e-6)
        assert (window[0].mean(dim=0) - window[1].mean(dim=0)).abs().min() > 1e-3
        assert h["loss"] == pytest.approx((h["clean_loss"] + h["adv_loss"]) / 2, abs=1e-4)  # in the units of loss
    assert result["vanishing_max_diff"] <= 1e-6
    for tau in (1, 2):
        assert result[f"resume_tau{tau}_max_diff"] == 0.0, tau
        assert result[f"resume_tau{tau}_moved"] > 1e-4  # the steps after the checkpoint changed the weights


@pytest.mark.parametrize("stage", [2, 3])
def test_delta_comes_from_weights_tau_steps_old_under_deepspeed(two_rank_deepspeed, stage):
    """τ = 2 under the Trainer's DeepSpeed path, 6 steps at a non-zero lr from the first, one
    untargeted L2 step from δ = 0 without dropout: δ_t equals that step written out on the
    saved w_{max(t-2, 0)}, and not on w_{t-3}, w_{t-1} or w_0."""
    from tests.test_recipe_bert import assert_delta_from_the_weights_tau_steps_old

    rec = two_rank_deepspeed[stage]["staleness"]
    assert [s["step"] for s in rec["steps"]] == list(range(6))
    steps = [(s["batch"], s["delta"]) for s in rec["steps"]]
    assert_delta_from_the_weights_tau_steps_old(rec["config"], rec["weights"], steps, tau=2)


@pytest.mark.parametrize("stage", [2, 3])
def test_snapshots_hold_this_ranks_shards_of_two_old_weight_versions(two_rank_deepspeed, stage):
    """At τ = 2 each rank holds two snapshots, each exactly its share of the weights (ZeRO-3 shards
    or ZeRO-2 flat partition, about half the model on 2 ranks) plus the module's buffers."""
    for rank, snap in enumerate(two_rank_deepspeed[stage]["snapshots"]):
        assert snap["held"] == 2 * (snap["shard"] + snap["buffers"]), rank
        assert snap["model"] / 2 <= snap["shard"] <= snap["model"] / 2 + 1024, rank  # DeepSpeed pads a little


def no_dropout_models():
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    bert = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {"bert": lambda: BertForMaskedLM(BertConfig(**bert)),
            "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))}


def sum_then_divide(outputs, labels, num_items_in_batch=None):
    """A user's compute_loss_func: token cross-entropy normalised over the accumulated batch."""
    logits = outputs.logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())


VANISHING = {"epsilon": 1e-12, "step_size": 1e-12, "norm": "l2", "targeted": False}
# GPT-2 cases use SGD: Adam's first update is about lr·g/|g| per coordinate, so GPT-2's
# mathematically zero gradients (softmax-invariant key biases, padded positions) turn rounding
# noise into lr-sized steps in both runs alike; SGD shows the loss path itself.
EQUIVALENCE = {  # case: (model, Trainer keyword arguments, compute_loss_func)
    "bert-ga2": ("bert", {"gradient_accumulation_steps": 2}, None),
    "bert-ga4": ("bert", {"gradient_accumulation_steps": 4}, None),
    "bert-label-smoothing-ga2": ("bert", {"gradient_accumulation_steps": 2, "label_smoothing_factor": 0.1}, None),
    "bert-loss-func-ga2": ("bert", {"gradient_accumulation_steps": 2}, sum_then_divide),
    "gpt2-num-items-ga2": ("gpt2", {"gradient_accumulation_steps": 2, "optim": "sgd"}, None),
    "gpt2-label-smoothing": ("gpt2", {"label_smoothing_factor": 0.1, "optim": "sgd"}, None),
}


def run_host(tmp_path, case, conadv):
    """The plain `Trainer` (conadv None) or ConAdvTrainer on the same model, data and seed."""
    from transformers import Trainer, TrainingArguments

    name, extra, loss_func = EQUIVALENCE[case]
    common = dict(per_device_train_batch_size=4, max_steps=6, logging_steps=2, report_to=[], use_cpu=True, seed=0,
                  learning_rate=5e-3, save_strategy="no", **extra)
    torch.manual_seed(0)
    model = no_dropout_models()[name]()
    if conadv is None:
        args, cls = TrainingArguments(str(tmp_path / "plain"), **common), Trainer
    else:
        args, cls = ConAdvTrainingArguments(str(tmp_path / "conadv"), conadv=conadv, **common), ConAdvTrainer
    trainer = cls(model=model, args=args, train_dataset=text_data(), compute_loss_func=loss_func)
    trainer.train()
    return trainer


@pytest.mark.parametrize("case", list(EQUIVALENCE))
@pytest.mark.parametrize("conadv", ["off", "vanishing"])
def test_trains_exactly_like_the_trainer_where_conadv_adds_nothing(tmp_path, case, conadv):
    """Disabled, or with ε → 0 (the adversarial half then equals the clean half), ConAdvTrainer's
    weights and logged losses follow the plain Trainer's at any accumulation, with label
    smoothing, a compute_loss_func, and models whose loss takes num_items_in_batch."""
    plain = run_host(tmp_path, case, None)
    ours = run_host(tmp_path, case, {"enabled": False} if conadv == "off" else VANISHING)
    for (n, a), b in zip(plain.model.named_parameters(), ours.model.parameters()):
        assert (a - b).abs().max() <= 1e-6, n
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, ours)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    if conadv == "vanishing":
        clean = [h["clean_loss"] for h in ours.state.log_history if "clean_loss" in h]
        adv = [h["adv_loss"] for h in ours.state.log_history if "adv_loss" in h]
        assert clean == pytest.approx(adv, rel=1e-5) and clean == pytest.approx(losses[0], rel=1e-5)


def test_embedding_space_is_not_clipped(tmp_path):
    """The README's Trainer example: an L2 ball on BERT's word embeddings, no clip range given."""
    trainer = trainer_for("bert-mlm", tmp_path, max_steps=1)
    trainer.args.gradient_accumulation_steps = 1
    seen = []
    original = trainer._delta

    def recording(inputs):
        delta = original(inputs)
        seen.append((inputs["input_ids"].clone(), delta.detach().clone()))
        return delta

    trainer._delta = recording
    trainer.train()
    ids, delta = seen[0]
    emb = trainer.model.get_input_embeddings()(ids).detach()
    assert (emb < 0).any() and ((emb + delta) < 0).any()  # a [0, 1] clamp would have removed every negative
    per_sequence = delta.flatten(1).norm(dim=1)
    assert per_sequence.max() <= TEXT["epsilon"] + 1e-5 and per_sequence.max() > 0.1


def test_hf_argument_parser_takes_inline_json(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser((ConAdvTrainingArguments,)).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--conadv", '{"space": "embedding", "epsilon": 0.1}'])
    assert args.conadv_config.epsilon == 0.1 and args.conadv_config.space == "embedding"
    with pytest.raises(ConfigError, match=r"^inline JSON .*: invalid"):
        HfArgumentParser((ConAdvTrainingArguments,)).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--report_to", "none", "--conadv", '{"epsilon": }'])


def test_resume_with_another_staleness_is_a_clear_error(tmp_path):
    trainer_for("bert-mlm", tmp_path / "a", {"staleness": 2}, save_strategy="steps", save_steps=2).train()
    other = trainer_for("bert-mlm", tmp_path / "b", {"staleness": 1})
    with pytest.raises(ConfigError, match=r"saved with conadv.staleness=2 but this run has 1"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_vit_on_processor_normalised_pixels_is_not_clipped_to_unit_range(tmp_path):
    """Image processors hand over (x − mean) / std: the adversarial pixel values must not be clamped
    to [0, 1] (that would destroy every negative input), and δ stays in the ε-ball."""
    make, images, block = models()["vit"]
    normalised = [{"pixel_values": (r["pixel_values"] - 0.5) / 0.5, "labels": r["labels"]} for r in images]
    torch.manual_seed(0)
    args = ConAdvTrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                                   use_cpu=True, seed=0, save_strategy="no", conadv=block)
    trainer = ConAdvTrainer(model=make(), args=args, train_dataset=normalised)
    seen = []
    original = trainer._delta

    def recording(inputs):
        delta = original(inputs)
        seen.append((inputs["pixel_values"].clone(), delta.clone()))
        return delta

    trainer._delta = recording
    trainer.train()
    x, delta = seen[0]
    assert (x + delta).min() < -0.5 and delta.abs().max() <= block["epsilon"] + 1e-6 and delta.abs().max() > 0


def test_conadv_adds_no_host_sync_per_micro_batch(tmp_path):
    """Tensor-to-host reads during `train()` (4 steps, logging every 2), ConAdv minus the same
    Trainer with conadv off: the same at gradient accumulation 1 and 4 — the statistics stay on
    the device and are read once per log, never per micro-batch. A ViT, whose forward reads
    nothing to the host (BERT's sdpa mask check in transformers reads once per forward, and
    ConAdv runs more forwards)."""
    from tests.common import counting_host_syncs

    def syncs(ga: int, enabled: bool) -> int:
        trainer = trainer_for("vit", tmp_path / f"ga{ga}-{enabled}", {"enabled": enabled},
                              gradient_accumulation_steps=ga)
        with counting_host_syncs() as count:
            trainer.train()
        return count.count

    extra = {ga: syncs(ga, True) - syncs(ga, False) for ga in (1, 4)}
    assert extra == {1: 2, 4: 2}  # one per log (steps 2 and 4)
