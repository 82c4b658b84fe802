"""Runs on 2 CPU ranks: trains the small CNN under every ZeRO stage and schedule with
conadv_ds and with raw DeepSpeed, and saves final weights and the δ each rank used."""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402

import conadv_ds  # noqa: E402
from benchmarks.harness import held_bytes  # noqa: E402
from conadv_ds.bn import fp32_batchnorm  # noqa: E402
from conadv_ds.cli import run_launched  # noqa: E402
from tests.common import (  # noqa: E402
    DETERMINISTIC,
    digits_batches,
    ds_config,
    make_model,
    rank_slice,
)
from tests.reference_attack import SCHEDULER, SHIPPED, SHIPPED_L2, recorded_draws  # noqa: E402

STEPS = 4


def full_params(module) -> list[torch.Tensor]:
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone().float() for p in params]


def master_params(engine) -> list[torch.Tensor]:
    """The optimizer's fp32 copy of every parameter (under bf16, what the update is applied to)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]


def run_ours(stage, conadv, gas=1, zero=None, record=False, extra=None, fp32_bn=False):
    """Trains STEPS steps; with `record`, keeps every attack's δ and the random numbers it drew
    (`recorded_draws`), per (step, micro-batch); `fp32_bn`: BatchNorm in fp32, as the recipes
    train in bf16."""
    model = fp32_batchnorm(make_model()) if fp32_bn else make_model()
    engine, *_ = conadv_ds.initialize(model=model, config={**ds_config(stage, gas, conadv, **(zero or {})),
                                                           **(extra or {})})
    rank = engine.global_rank
    initial = full_params(engine.module)
    deltas, draws = {}, {}
    if record and hasattr(engine.schedule, "attack"):
        attack = engine.schedule.attack

        def recording(batch, step, micro):
            with recorded_draws() as log:
                d = attack(batch, step, micro)
            deltas[step, micro], draws[step, micro] = d.clone(), log
            return d

        engine.schedule.attack = recording
    micro_batches = [rank_slice(mb, rank) for step in digits_batches(STEPS, gas) for mb in step]
    data = (tuple(t.clone() for t in mb) for mb in micro_batches)  # fresh tensors, as a DataLoader gives
    metrics, memory = [], {}
    for step in range(STEPS):
        metrics.append(engine.train_batch(data))
        if step == 1:  # mid-run: a lookahead holds the next step's batches and their δ
            memory = {"accounted": engine.stale_bytes(), "measured": held_bytes(engine.schedule, engine.ds, data),
                      "one_step_with_delta": sum(2 * x.nbytes + y.nbytes
                                                 for x, y in micro_batches[(step + 1) * gas:(step + 2) * gas])}
    bf16_master = engine.bfloat16_enabled() and stage > 0  # at ZeRO-0, safe_get_full_fp32_param finds none
    return {"initial": initial, "params": full_params(engine.module), "deltas": deltas, "draws": draws,
            "master": master_params(engine) if bf16_master else None, "metrics": metrics, "memory": memory,
            "model_bytes": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                               for p in engine.module.parameters()) * 4}


def run_raw(stage, gas=1):
    model = make_model()
    cfg = ds_config(stage, gas)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    rank = engine.global_rank
    for step in digits_batches(STEPS, gas):
        for mb in step:
            x, y = rank_slice(mb, rank)
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
    return {"params": full_params(engine.module)}


def run_bert(stage, conadv):
    """Tiny BertForMaskedLM with dropout, embedding-space attack, dict batches."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.2))
    cfg = ds_config(stage, 1, {"space": "embedding", "norm": "l2", "epsilon": 1.0, "step_size": 0.5, "steps": 2,
                               "targeted": False, **conadv})
    engine, *_ = conadv_ds.initialize(model=model, config=cfg)
    initial = full_params(engine.module)
    g = torch.Generator().manual_seed(100 + engine.global_rank)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(4, 64, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[::2, 8:] = 0
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels.masked_fill(mask == 0, -100)})
    torch.manual_seed(7)  # the training RNG (dropout); the attack must not advance it
    data = iter(batches)
    metrics = [engine.train_batch(data) for _ in range(STEPS)]
    return {"initial": initial, "params": full_params(engine.module), "metrics": metrics}


def grads_untouched(stage):
    """Backward on one micro-batch (no boundary), attack, and compare the parameter grads."""
    model = make_model()
    engine, *_ = conadv_ds.initialize(model=model, config=ds_config(stage, 2, {"schedule": "disadv", **DETERMINISTIC}))
    x, y = rank_slice(digits_batches(1)[0][0], engine.global_rank)
    engine.backward(F.cross_entropy(engine(x), y))
    before = [p.grad.clone() for p in engine.module.parameters()]
    engine.schedule.attack((x, y), 0, 0)
    after = [p.grad.clone() for p in engine.module.parameters()]
    return all(torch.equal(a, b) for a, b in zip(before, after))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    for stage in (0, 1, 2, 3):
        results[f"raw/z{stage}"] = run_raw(stage)
        results[f"off/z{stage}"] = run_ours(stage, {"enabled": False})
        results[f"noblock/z{stage}"] = run_ours(stage, None)
        results[f"disadv/z{stage}"] = run_ours(stage, {"schedule": "disadv", **DETERMINISTIC}, record=True)
        results[f"lookahead1/z{stage}"] = run_ours(stage, {"schedule": "conadv", "staleness": 1, **DETERMINISTIC},
                                                   record=True)
        results[f"snapshot1/z{stage}"] = run_ours(stage, {"schedule": "conadv", "staleness": 1,
                                                          "stale_weights": "snapshot", **DETERMINISTIC}, record=True)
        results[f"snapshot2/z{stage}"] = run_ours(stage, {"schedule": "conadv", "staleness": 2, **DETERMINISTIC},
                                                  record=True)
    results["snapshot2/z3/persist0"] = run_ours(
        3, {"schedule": "conadv", "staleness": 2, **DETERMINISTIC}, zero={"stage3_param_persistence_threshold": 0},
        record=True)
    results["lookahead1/z2/gas2"] = run_ours(2, {"schedule": "conadv", "staleness": 1, **DETERMINISTIC}, gas=2,
                                             record=True)
    results["snapshot1/z3/gas2"] = run_ours(3, {"schedule": "conadv", "staleness": 1, "stale_weights": "snapshot",
                                                **DETERMINISTIC}, gas=2, record=True)
    results["raw/z0/gas2"] = run_raw(0, gas=2)
    results["off/z3/gas2"] = run_ours(3, None, gas=2)
    bf16 = {"bf16": {"enabled": True}, "data_types": {"buffer_dtype": "bf16"}}
    la, sn = {"schedule": "conadv", "staleness": 1, **DETERMINISTIC}, {"stale_weights": "snapshot"}
    for stage in (0, 2, 3):
        results[f"lookahead1/z{stage}/bf16"] = run_ours(stage, la, extra=bf16)
        results[f"snapshot1/z{stage}/bf16"] = run_ours(stage, {**la, **sn}, extra=bf16)
        results[f"bert/lookahead/z{stage}"] = run_bert(stage, {"staleness": 1})
        results[f"bert/snapshot/z{stage}"] = run_bert(stage, {"staleness": 1, "stale_weights": "snapshot"})
    # controls of the bounds above: a 10% smaller ε is a real difference
    results["lookahead1/z0/bf16/eps0.9"] = run_ours(0, {**la, "epsilon": 0.9 * la["epsilon"]}, extra=bf16)
    results["bert/lookahead/z0/eps0.9"] = run_bert(0, {"staleness": 1, "epsilon": 0.9})
    for stage in (0, 3):
        results[f"auxbn/lookahead/z{stage}"] = run_ours(stage, {**la, "aux_bn": True})
        results[f"auxbn/snapshot/z{stage}"] = run_ours(stage, {**la, **sn, "aux_bn": True})
    for stage in (0, 2):  # the attack reads BatchNorm running statistics: they must be the stale step's too
        for aux in (False, True):
            evalbn = {**la, "attack_bn": "eval", "aux_bn": aux}
            results[f"evalbn/aux{int(aux)}/lookahead/z{stage}"] = run_ours(stage, evalbn, record=True)
            results[f"evalbn/aux{int(aux)}/snapshot/z{stage}"] = run_ours(stage, {**evalbn, **sn}, record=True)
    # the shipped attack (targeted, clean start 0.2, auxiliary BatchNorm, τ = 1) under an LR schedule;
    # bf16 as the paper configs and the recipe run it: BatchNorm and its statistics in fp32
    shipped = {"scheduler": SCHEDULER}
    results["shipped/z2"] = run_ours(2, SHIPPED, record=True, extra=shipped)
    results["shipped/z3"] = run_ours(3, SHIPPED, record=True, extra=shipped)
    results["shipped/l2/z3"] = run_ours(3, {**SHIPPED, **SHIPPED_L2}, record=True, extra=shipped)
    results["shipped/z2/bf16"] = run_ours(2, SHIPPED, record=True, extra={**shipped, "bf16": {"enabled": True}},
                                          fp32_bn=True)
    results["grads_untouched/z0"] = grads_untouched(0)
    results["grads_untouched/z1"] = grads_untouched(1)
    rank = torch.distributed.get_rank()
    torch.save(results, f"{args.out}.rank{rank}")


if __name__ == "__main__":
    run_launched(main)
