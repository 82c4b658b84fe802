"""The `conadv` block and the DeepSpeed checks: every error is one line naming field and value."""

import json

import pytest

from conadv_ds.config import ConAdvConfig, resolve_batch
from conadv_ds.errors import ConfigError
from conadv_ds.resolve import resolve_config

BASE = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}

BAD = [
    # (conadv block or full-config patch, world size, expected text in the message)
    ({"conadv": {"epsilom": 0.1}}, 2, "conadv.epsilom: unknown key (did you mean 'epsilon'?)"),
    ({"conadv": {"shedule": "conadv"}}, 2, "did you mean 'schedule'"),
    ({"conadv": {"schedule": "fast"}}, 2, "conadv.schedule='fast'"),
    ({"conadv": {"space": "latent"}}, 2, "conadv.space='latent'"),
    ({"conadv": {"norm": "l1"}}, 2, "conadv.norm='l1'"),
    ({"conadv": {"epsilon": -0.1}}, 2, "conadv.epsilon=-0.1: must be > 0"),
    ({"conadv": {"epsilon": "big"}}, 2, "conadv.epsilon='big'"),
    ({"conadv": {"step_size": 0}}, 2, "conadv.step_size=0: must be > 0"),
    ({"conadv": {"steps": 0}}, 2, "conadv.steps=0: must be >= 1"),
    ({"conadv": {"steps": 1.5}}, 2, "conadv.steps=1.5"),
    ({"conadv": {"staleness": 0}}, 2, "conadv.staleness=0: must be >= 1 for schedule 'conadv'"),
    ({"conadv": {"staleness": -1, "schedule": "disadv"}}, 2, "conadv.staleness=-1: must be >= 0"),
    ({"conadv": {"staleness": 2, "stale_weights": "lookahead"}}, 2, "conadv.stale_weights='lookahead'"),
    ({"conadv": {"stale_weights": "copy"}}, 2, "conadv.stale_weights='copy'"),
    ({"conadv": {"clean_start_prob": 1.2}}, 2, "conadv.clean_start_prob=1.2: must be in [0, 1]"),
    ({"conadv": {"adv_weight": 0}}, 2, "conadv.adv_weight=0: must be in (0, 1]"),
    ({"conadv": {"adv_weight": 1.5}}, 2, "conadv.adv_weight=1.5"),
    ({"conadv": {"clip_range": [1, 0]}}, 2, "conadv.clip_range"),
    ({"conadv": {"clip_range": [0, 1, 2]}}, 2, "conadv.clip_range"),
    ({"conadv": {"attack_bn": "frozen"}}, 2, "conadv.attack_bn='frozen'"),
    ({"conadv": {"aux_bn": "maybe"}}, 2, "conadv.aux_bn='maybe'"),
    ({"conadv": {"targeted": "yes please"}}, 2, "conadv.targeted="),
    ({"conadv": {"attacker_ranks": 1}}, 2, "conadv.attacker_ranks=1: is only valid with schedule 'split'"),
    ({"conadv": [1, 2]}, 2, "conadv=[1, 2]: must be a JSON object"),
    ({"train_batch_size": 30}, 2, "train_batch_size=30: not divisible by train_micro_batch_size_per_gpu (8) × world size (2)"),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 3}, 2, "train_batch_size=64: must equal"),
    ({"train_batch_size": -4}, 2, "train_batch_size=-4: must be a positive integer"),
    ({"train_micro_batch_size_per_gpu": "8"}, 2, "train_micro_batch_size_per_gpu='8'"),
    ({"train_batch_size": None, "train_micro_batch_size_per_gpu": None}, 2, "train_batch_size: missing"),
    ({"zero_optimization": {"stage": 4}}, 2, "zero_optimization.stage=4: allowed: 0, 1, 2, 3"),
    ({"zero_optimization": 3}, 2, "zero_optimization=3: must be a JSON object"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, 2, "fp16.enabled=true and bf16.enabled=true"),
    ({"bf16": True}, 2, "bf16=True: must be a JSON object"),
    ({"gradient_clipping": -1}, 2, "gradient_clipping=-1: must be a number >= 0"),
    ({"train_batch_size": 32}, 3, "not divisible by train_micro_batch_size_per_gpu (8) × world size (3)"),
    # strict types and finite numbers
    ({"conadv": {"epsilon": float("inf")}}, 2, "conadv.epsilon=inf: must be a finite number"),
    ({"conadv": {"step_size": float("nan")}}, 2, "conadv.step_size=nan: must be a finite number"),
    ({"conadv": {"aux_bn": "yes"}}, 2, "conadv.aux_bn='yes': must be true or false"),
    ({"conadv": {"targeted": 1}}, 2, "conadv.targeted=1: must be true or false"),
    ({"conadv": {"steps": 2.0}}, 2, "conadv.steps=2.0: must be an integer"),
    ({"conadv": {"seed": "7"}}, 2, "conadv.seed='7': must be an integer"),
    ({"fp16": {"enabled": True, "initial_scale_power": float("inf")}}, 2,
     "fp16.initial_scale_power=inf: must be a finite number"),
    # optimizer and scheduler types and fields, ours and DeepSpeed's
    ({"optimizer": {"type": "Larsss", "params": {"lr": 0.1}}}, 2, "optimizer.type='Larsss': unknown (did you mean 'LARS'?)"),
    ({"optimizer": {"type": "sgd", "params": {"lr": 0.1}}}, 2, "optimizer.type='sgd': unknown (did you mean 'SGD'?)"),
    ({"optimizer": {"type": "Adam", "params": {"lr": -1}}}, 2, "optimizer.params.lr=-1: must be > 0"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 1.2]}}}, 2,
     "optimizer.params.betas=(0.9, 1.2): must be two numbers in [0, 1)"),
    ({"optimizer": {"type": "LARS", "params": {"lr": -0.1}}}, 2, "optimizer.params.lr=-0.1: must be > 0"),
    ({"optimizer": {"type": "LARS", "params": {"lr": 0.1, "momentum": "0.9"}}}, 2,
     "optimizer.params.momentum='0.9': must be a number"),
    ({"optimizer": {"type": "LAMB", "params": {"lr": 0.1, "betas": [0.9, 1.5]}}}, 2, "optimizer.params.betas"),
    ({"scheduler": {"type": "WarmupLRR", "params": {}}}, 2, "scheduler.type='WarmupLRR': unknown (did you mean 'WarmupLR'?)"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": -5}}}, 2,
     "scheduler.params.warmup_num_steps=-5: must be >= 0"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100.0}}}, 2,
     "scheduler.params.total_num_steps=100.0: must be an integer"),
    ({"scheduler": {"type": "WarmupPolyDecay", "params": {"total_num_steps": 10, "warmup_num_steps": -1}}}, 2,
     "scheduler.params.warmup_num_steps=-1"),
    # ZeRO-3 features the old-weight mechanisms do not reach
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}, "conadv": {"staleness": 2}}, 2,
     "zero_optimization.zero_hpz_partition_size=2: not supported with conadv old weights by snapshot"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "conadv": {"stale_weights": "snapshot"}},
     2, "zero_optimization.offload_param.device='cpu': not supported with conadv old weights by snapshot"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}},
      "conadv": {"schedule": "split", "attacker_ranks": 1}}, 3,
     "zero_optimization.offload_param.device='nvme': not supported with conadv old weights by split"),
]

GOOD = [
    {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.999], "weight_decay": "auto"}}},
    {"optimizer": {"type": "adam", "params": {"lr": 1e-3, "torch_adam": True}}},
    {"optimizer": {"type": "LAMB", "params": {"lr": 1e-3, "betas": [0.9, 0.999]}}},
    {"scheduler": {"type": "CosineAnnealingLR", "params": {"T_max": 5}}},
    {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": 0.1}}},
    {"conadv": {"clip_range": [0, 1], "epsilon": 1}},
    {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}, "conadv": {"staleness": 1}},  # lookahead
    {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "conadv": {"schedule": "disadv",
                                                                                      "staleness": 0}},
]


def test_the_trainer_refuses_hpz_for_any_staleness():
    """The Trainer hands over one micro-batch at a time: snapshots even at staleness 1."""
    from conadv_ds.hf import ConAdvTrainingArguments

    ds = {"train_batch_size": "auto", "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}
    with pytest.raises(ConfigError, match="zero_hpz_partition_size=2: not supported with conadv old weights by "
                                          r"snapshot \(the Trainer attacks one micro-batch at a time\)"):
        ConAdvTrainingArguments(output_dir="unused", deepspeed=ds, conadv={"staleness": 1}, report_to=[])


@pytest.mark.parametrize("patch", GOOD)
def test_good_values_pass(patch):
    """Control for the strict checks above: what DeepSpeed and JSON users write is accepted."""
    resolve_config({**BASE, **patch}, launch_size=2)


def test_a_real_start_makes_the_same_checks():
    """initialize() fails on the same line before DeepSpeed starts."""
    import conadv_ds
    from tests.common import make_model

    with pytest.raises(ConfigError, match=r"optimizer.type='Larsss': unknown \(did you mean 'LARS'\?\)"):
        conadv_ds.initialize(model=make_model(), config={**BASE, "optimizer": {"type": "Larsss", "params": {"lr": 1}}})


@pytest.mark.parametrize("patch,world,expected", BAD)
def test_bad_config_is_one_clear_line(patch, world, expected):
    cfg = {**BASE, **patch}
    with pytest.raises(ConfigError) as e:
        resolve_config(cfg, launch_size=world)
    msg = str(e.value)
    assert expected in msg, msg
    assert "\n" not in msg


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing.json': not found"):
        resolve_config(tmp_path / "missing.json", launch_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,\n "conadv": {')
    with pytest.raises(ConfigError, match=r"bad.json': invalid JSON at line 2 column"):
        resolve_config(bad, launch_size=1)
    arr = tmp_path / "arr.json"
    arr.write_text("[1]")
    with pytest.raises(ConfigError, match="top level must be a JSON object, got list"):
        resolve_config(arr, launch_size=1)


def test_block_is_removed_and_parsed(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "conadv": {"schedule": "disadv", "epsilon": 0.5}}))
    run = resolve_config(path, launch_size=2)
    ds, cfg = run.ds, run.conadv
    assert "conadv" not in ds and ds["train_batch_size"] == 32
    assert cfg.schedule == "disadv" and cfg.epsilon == 0.5 and cfg.enabled
    assert (run.batch.micro_batch_per_rank, run.batch.gradient_accumulation_steps) == (8, 2)
    assert not resolve_config(BASE, launch_size=2).conadv.enabled  # no block: plain DeepSpeed
    assert not resolve_config({**BASE, "conadv": {"enabled": False}}, launch_size=2).conadv.adversarial
    over = resolve_config(path, {"epsilon": 0.25, "steps": 3}, launch_size=2).conadv
    assert over.epsilon == 0.25 and over.steps == 3 and over.schedule == "disadv"


@pytest.mark.parametrize("fields,world,expected", [
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}, 2, (64, 8, 4)),
    ({"train_batch_size": 64}, 4, (64, 16, 1)),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 2}, 4, (64, 8, 2)),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 3}, 2, (48, 8, 3)),
    ({"train_batch_size": 98304, "train_micro_batch_size_per_gpu": 64}, 512, (98304, 64, 3)),
])
def test_batch_arithmetic(fields, world, expected):
    assert resolve_batch(fields, world) == expected


def test_config_is_immutable():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ConAdvConfig().epsilon = 1.0


def test_half_precision_batchnorm_needs_buffer_dtype():
    import conadv_ds
    from tests.common import make_model

    with pytest.raises(ConfigError, match=r'bf16.enabled=true with BatchNorm.*"buffer_dtype": "bf16"'):
        conadv_ds.initialize(model=make_model(), config={**BASE, "train_batch_size": 8, "bf16": {"enabled": True}})


def test_embedding_space_on_a_model_without_embeddings_fails_before_deepspeed():
    import conadv_ds
    from tests.common import make_model

    with pytest.raises(ConfigError, match="conadv.space='embedding': model SmallCNN has no get_input_embeddings"):
        conadv_ds.initialize(model=make_model(), config={**BASE, "train_batch_size": 8,
                                                         "conadv": {"space": "embedding"}})


@pytest.mark.parametrize("tb,world,expected", [(98304, 256, (128, 3)), (1024, 512, (2, 1)), (1024, 8, (128, 1)),
                                               (4096, 24, None), (3 * 1024, 8, (128, 3))])
def test_max_micro_batch_derives_accumulation(tb, world, expected):
    cfg = {"train_batch_size": tb, "max_train_micro_batch_size_per_gpu": 128}
    if expected is None:
        with pytest.raises(ConfigError, match=r"train_batch_size=4096: not divisible by gradient_accumulation_steps"):
            resolve_config(cfg, launch_size=world)
        return
    run = resolve_config(cfg, launch_size=world)
    assert (run.batch.micro_batch_per_rank, run.batch.gradient_accumulation_steps) == expected
    assert "max_train_micro_batch_size_per_gpu" not in run.ds  # ours: DeepSpeed never sees it
    assert run.ds["train_micro_batch_size_per_gpu"] * run.ds["gradient_accumulation_steps"] * world == tb


def test_max_micro_batch_errors():
    with pytest.raises(ConfigError, match=r"^max_train_micro_batch_size_per_gpu=0: must be a positive integer$"):
        resolve_config({"train_batch_size": 64, "max_train_micro_batch_size_per_gpu": 0}, launch_size=2)
    with pytest.raises(ConfigError, match=r"set it instead of train_micro_batch_size_per_gpu"):
        resolve_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8,
                        "max_train_micro_batch_size_per_gpu": 16}, launch_size=2)


def test_aux_bn_after_the_optimizer_is_refused():
    """The auxiliary BatchNorm parameters would never reach an optimizer built before them."""
    import torch

    import conadv_ds
    from tests.common import make_model

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"conadv.aux_bn=true: the auxiliary BatchNorm parameters are added"):
        conadv_ds.initialize(model=model, optimizer=optimizer, config={**BASE, "conadv": {"aux_bn": True}})
    with pytest.raises(ConfigError, match=r"conadv.aux_bn=true"):
        conadv_ds.initialize(model=model, model_parameters=list(model.parameters()),
                             config={**BASE, "conadv": {"aux_bn": True}})


@pytest.mark.parametrize("block,overrides,expected", [
    (None, None, None),                      # defaults alone do not switch ConAdv on
    ({}, None, 0.3),                         # a block without the field takes the recipe's default
    ({"adv_weight": 0.5}, None, 0.5),        # the JSON beats the default
    ({"adv_weight": 0.5}, {"adv_weight": 0.7}, 0.7),  # a flag beats the JSON
    (None, {"steps": 2}, 0.3),               # a flag switches it on, the default fills the rest
])
def test_recipe_defaults_rank_below_the_json_and_the_flags(block, overrides, expected):
    cfg = {**BASE, **({} if block is None else {"conadv": block})}
    run = resolve_config(cfg, overrides, launch_size=2, defaults={"adv_weight": 0.3})
    assert (run.conadv.adv_weight if run.conadv.enabled else None) == expected


def test_deepspeeds_throughput_timer_is_off_unless_configured():
    """DeepSpeed's timer synchronizes the device at every engine forward (three per ConAdv
    micro-batch): off by default, a `timers` block the user wrote is passed on as written."""
    assert resolve_config(BASE, launch_size=4).ds["timers"] == {"throughput": {"enabled": False}}
    mine = {"throughput": {"enabled": True, "synchronized": True}}
    assert resolve_config({**BASE, "timers": mine}, launch_size=4).ds["timers"] == mine
