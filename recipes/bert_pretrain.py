"""BERT masked-LM pretraining with embedding-space ConAdv, launched by `accelerate launch`.

    accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file ds_configs/bert_demo.json \\
        recipes/bert_pretrain.py --max_steps 30 --output_dir runs/bert           # DeepSpeed ZeRO-2 (or _zero3)
    accelerate launch --num_processes 2 recipes/bert_pretrain.py --deepspeed_config ds_configs/bert_demo.json \\
        --max_steps 30 --output_dir runs/bert_ddp                                 # plain DDP, same JSON

The JSON's `conadv`, optimizer (LAMB), scheduler (WarmupPolyDecay) and `lr_scaling` blocks are
read here; DeepSpeed gets the rest. δ lives on the word-embedding output (padding never
perturbed) and, with τ = 1, is computed while the previous step's weights are in place.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

from conadv_ds.cli import count, one_line_errors, parse_overrides
from conadv_ds.config import load_json, validate_block
from conadv_ds.errors import ConfigError
from conadv_ds.resolve import RunConfig, resolve_config


class BertRecipe(BaseModel):
    """The JSON's optional `recipe` block: defaults for the flags of the same names."""

    model_config = ConfigDict(extra="forbid")

    model_size: Literal["tiny", "mini", "small", "base", "large"] = "tiny"
    max_seq_length: int = 128
    max_steps: int = 100
    phase2_seq_length: Optional[int] = None
    phase2_steps: int = 0
    note: str = ""


SIZES = {  # hidden, layers, heads, intermediate
    "tiny": (64, 2, 2, 256), "mini": (256, 4, 4, 1024), "small": (512, 4, 8, 2048),
    "base": (768, 12, 12, 3072), "large": (1024, 24, 16, 4096),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", help="JSON with conadv/optimizer/scheduler blocks (default: accelerate's "
                   "--deepspeed_config_file)")
    p.add_argument("--model_size", choices=list(SIZES))
    p.add_argument("--model_dir", help="continue from weights saved with save_pretrained")
    p.add_argument("--tokenizer_dir", help="a saved tokenizer; default: train WordPiece on the corpus")
    p.add_argument("--vocab_size", type=int, default=3000)
    p.add_argument("--train_files", nargs="*", help="text files (one text per line)")
    p.add_argument("--dataset_dir", help="a `datasets` dataset saved with save_to_disk (column 'text')")
    p.add_argument("--strict_data", action="store_true", help="stop at the first empty line instead of skipping it")
    p.add_argument("--max_seq_length", type=int)
    p.add_argument("--phase2_seq_length", type=int, help="second phase sequence length (LAMB's 128 then 512)")
    p.add_argument("--phase2_steps", type=count)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max_steps", type=count)
    p.add_argument("--output_dir", default="runs/bert")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_interval", type=count, default=10)
    p.add_argument("--eval_interval", type=count, default=0, help="held-out evaluation every N steps (0: at the end)")
    p.add_argument("--conadv", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry_run", action="store_true", help="validate the config for --world_size and print the plan")
    p.add_argument("--world_size", type=int, help="world size for --dry_run")
    p.add_argument("--record_deltas", type=count, default=0, metavar="N",
                   help="save the first N steps' δ, batches and preceding weights (rank 0) for inspection")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """Everything `train` needs that is known before the corpus or the model is loaded."""

    run: RunConfig
    use_deepspeed: bool
    """Launched by `accelerate launch --use_deepspeed` (else plain DDP or one process)."""


def make_plan(args: argparse.Namespace) -> Plan:
    path = args.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        raise ConfigError("no config: pass --deepspeed_config or launch with accelerate's --deepspeed_config_file")
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    world = args.world_size if args.dry_run and args.world_size else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1:
        raise ConfigError(f"--world_size={world}: must be >= 1")
    raw = load_json(path)
    recipe = validate_block(BertRecipe, raw.pop("recipe", {}), "recipe")
    for key in ("model_size", "max_seq_length", "max_steps", "phase2_seq_length", "phase2_steps"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(recipe, key))
    overrides = parse_overrides(args.conadv)
    block = raw.get("conadv") if isinstance(raw.get("conadv"), dict) else {}
    if {**block, **overrides}.get("schedule") == "split":
        raise ConfigError("conadv.schedule='split': this recipe runs clean, disadv and conadv; attacker ranks "
                          "are available through conadv_ds.initialize and recipes/resnet_imagenet.py")
    run = resolve_config(raw, overrides, world)
    if run.conadv.adversarial and run.conadv.space == "pixel":
        raise ConfigError("conadv.space='pixel': this recipe perturbs word embeddings; set 'embedding' or 'auto'")
    if run.optimizer is None:
        raise ConfigError(f"optimizer: {path} must use type 'LAMB' or 'LARS' (built by conadv_ds)")
    for f in args.train_files or []:
        if not Path(f).is_file():
            raise ConfigError(f"--train_files: {f!r} not found")
    return Plan(run, use_deepspeed)


@one_line_errors
def main(argv=None) -> None:
    args = parse_args(argv)
    plan = make_plan(args)
    if args.dry_run:
        b, conadv = plan.run.batch, plan.run.conadv
        print(f"plan on {b.world_size} ranks: train_batch_size {b.train_batch_size} = micro-batch "
              f"{b.micro_batch_per_rank} × gradient accumulation {b.gradient_accumulation_steps} × world size "
              f"{b.world_size}; BERT-{args.model_size}, sequence length {args.max_seq_length}, {args.max_steps} steps"
              + (f" then {args.phase2_steps} at {args.phase2_seq_length}" if args.phase2_steps else "")
              + f"; optimizer {plan.run.optimizer['type']}, conadv "
              + (f"{conadv.schedule} τ={conadv.staleness} ε={conadv.epsilon:g} {conadv.norm} steps={conadv.steps}"
                 if conadv.adversarial else "off"))
        return
    train(args, plan)


def train(args: argparse.Namespace, plan: Plan) -> None:
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import DeepSpeedPlugin
    from tqdm import tqdm
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    from conadv_ds import batch as B
    from conadv_ds import optim
    from conadv_ds.data import text
    from conadv_ds.fingerprint import weights_sha256
    from conadv_ds.objective import Objective, StepMetrics
    from conadv_ds.perturb import resolve_space
    from conadv_ds.schedule import Pull, build_schedule

    run, use_deepspeed = plan.run, plan.use_deepspeed
    conadv, micro, gas = run.conadv, run.batch.micro_batch_per_rank, run.batch.gradient_accumulation_steps
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(args.output_dir)
    torch.manual_seed(args.seed)

    corpus = text.read_corpus(args.train_files, args.dataset_dir, strict=args.strict_data)
    texts = corpus.texts
    if corpus.skipped and rank == 0:
        print(f"skipped {corpus.skipped} empty lines of the corpus", flush=True)
    train_texts, held_texts = text.train_heldout_split(texts)
    if args.tokenizer_dir:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer_dir)
    else:
        tokenizer = text.train_tokenizer(train_texts, args.vocab_size, out / "tokenizer" if rank == 0 else None)
    train_examples = text.PackedExamples(train_texts, tokenizer, args.max_seq_length)
    if len(train_examples) < micro * gas * world:
        raise ConfigError(f"train_batch_size={micro * gas * world} is larger than the corpus ({len(train_examples)} "
                          f"sequences of {args.max_seq_length} tokens); point --train_files or --dataset_dir at a "
                          "bigger corpus, or use ds_configs/bert_demo.json")
    launched = world > 1 and not torch.cuda.is_available()  # on CPU accelerate needs to be told gloo
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched else [],
                              deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=run.ds) if use_deepspeed else None,
                              gradient_accumulation_steps=1 if use_deepspeed else gas)
    if args.model_dir:
        model = BertForMaskedLM.from_pretrained(args.model_dir)
    else:
        hidden, layers, heads, inter = SIZES[args.model_size]
        longest = max(args.max_seq_length, args.phase2_seq_length or 0)
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                           num_attention_heads=heads, intermediate_size=inter,
                                           max_position_embeddings=longest, hidden_dropout_prob=args.dropout,
                                           attention_probs_dropout_prob=args.dropout))
    collate = text.collator(tokenizer)
    optimizer = optim.build_optimizer(run.optimizer, model)
    scheduler = optim.build_scheduler(run.scheduler, optimizer) if run.scheduler else None
    # The scheduler stays ours: stepped once per optimizer step below (accelerate would step it
    # once per process, DeepSpeed once per engine step: neither is the schedule's unit).
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = accelerator.deepspeed_engine_wrapped.engine if use_deepspeed else model
    if use_deepspeed:
        optim.bind_to_engine(engine)
    module = accelerator.unwrap_model(model)
    space = resolve_space(conadv, module) if conadv.adversarial else None
    schedule = build_schedule(conadv, space, engine, module, rank=rank, autocast=accelerator.autocast)
    eval_attack = build_schedule(conadv.model_copy(update={"schedule": "disadv"}), space, engine, module, rank=rank,
                                 autocast=accelerator.autocast) if conadv.adversarial else None
    objective = Objective(space, conadv.adv_weight, module)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print("conadv config: " + json.dumps(conadv.model_dump(), sort_keys=True), flush=True)
        print(f"{'deepspeed' if use_deepspeed else 'ddp'} on {world} ranks, {len(train_texts)} texts, "
              f"vocab {len(tokenizer)}, {sum(p.numel() for p in module.parameters()) / 1e6:.2f}M parameters",
              flush=True)

    def stream_for(seq_len: int):
        examples = train_examples if seq_len == args.max_seq_length else text.PackedExamples(train_texts, tokenizer,
                                                                                             seq_len)
        return text.mlm_stream(examples, micro, rank, world, args.seed, collate)

    held = text.masked_batches(text.PackedExamples(held_texts, tokenizer, args.max_seq_length), 32, collate, seed=1)
    state_file = out / "trainer_state.json"
    start_step = 0
    if args.resume and state_file.is_file():
        accelerator.load_state(str(out / "checkpoint"))
        start_step = json.loads(state_file.read_text())["step"]
    stream = stream_for(args.max_seq_length)
    for _ in range(start_step * gas):
        next(stream)

    def forward(batch):
        output = model(**batch)
        return output.loss, output

    records = {"weights": [], "steps": []}
    stats = StepMetrics()
    bar = tqdm(total=args.max_steps, initial=start_step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    t0, phase2_from = time.time(), args.max_steps - args.phase2_steps if args.phase2_seq_length else None
    for step in range(start_step, args.max_steps):
        if phase2_from is not None and step == phase2_from:
            stream = stream_for(args.phase2_seq_length)
        if step < args.record_deltas:
            records["weights"].append(_full_state(module))
        start = time.perf_counter()
        batches = schedule.prepare(step, Pull(lambda source=stream: [B.to_device(next(source), accelerator.device)
                                                                     for _ in range(gas)], stream))
        for batch, delta in batches:
            with accelerator.accumulate(model):
                micro_step = objective(forward, batch, delta)
                accelerator.backward(micro_step.loss)
                optimizer.step()
                optimizer.zero_grad()
            stats.add(micro_step.stats)
        if scheduler is not None:
            scheduler.step()
        if step < args.record_deltas:
            records["steps"].append({"batch": B.to_device(batches[0][0], "cpu"),
                                     "delta": None if batches[0][1] is None else batches[0][1].cpu()})
        m = stats.read()
        bar.update(1)
        if rank == 0 and ((step + 1) % args.log_interval == 0 or step + 1 == args.max_steps):
            lr = optimizer.param_groups[0]["lr"]
            parts = " ".join(f"{k} {m[k]:.4f}" for k in ("loss", "clean_loss", "adv_loss") if k in m)
            bar.write(f"step {step + 1}/{args.max_steps} {parts} lr {lr:.4g} "
                      f"samples/s {micro * gas * world / (time.perf_counter() - start):.0f}")
        if args.eval_interval and (step + 1) % args.eval_interval == 0 and step + 1 < args.max_steps:
            evaluate(module, held, space, eval_attack, accelerator, f"step {step + 1}")
    bar.close()
    evaluate(module, held, space, eval_attack, accelerator, "final")
    accelerator.save_state(str(out / "checkpoint"))
    sha = weights_sha256(module)
    state = accelerator.get_state_dict(model)
    if args.record_deltas:  # every rank: its own batches; the weights are the same everywhere
        torch.save({**records, "config": module.config.to_dict(), "conadv": conadv.model_dump()},
                   out / f"deltas_rank{rank}.pt")
    if rank == 0:
        state_file.write_text(json.dumps({"step": args.max_steps}))
        module.save_pretrained(str(out / "model"), state_dict=state)
        print(f"trained {args.max_steps - start_step} steps in {time.time() - t0:.0f} s", flush=True)
        print(f"weights_sha256={sha}", flush=True)


def _full_state(module) -> list:
    """Every parameter in full (gathered under ZeRO-3; collective), as CPU fp32 copies."""
    import deepspeed
    import torch

    out = []
    for p in module.parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out.append(p.detach().to(torch.float32).cpu().clone())
    return out


def evaluate(module, held, space, attack, accelerator, tag: str) -> None:
    """Held-out MLM loss and masked-token accuracy, clean and under the embedding attack (from
    the current weights), summed over ranks on the device."""
    import torch

    from conadv_ds import batch as B
    from conadv_ds.reduce import all_reduce_sum

    was = module.training
    module.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # loss, adv loss, correct, adv correct, n
    for i, b in enumerate(held):
        b = B.to_device(b, accelerator.device)
        with torch.no_grad():
            out = module(**b)
        correct, counted = B.correct(out, b)
        sums[0] += out.loss.detach()
        sums[2] += correct
        sums[4] += counted
        if attack is not None:
            delta = attack.attack_micro(-1, i, b, last=True)
            with torch.no_grad():
                adv = space.forward(module, b, delta)
            sums[1] += adv.loss.detach()
            sums[3] += B.correct(adv, b)[0]
    module.train(was)
    loss, adv_loss, correct, adv_correct, n = all_reduce_sum(sums).tolist()
    n, batches = max(n, 1.0), len(held) * accelerator.num_processes
    if accelerator.is_main_process:
        print(f"eval {tag}: mlm_loss {loss / batches:.4f} masked_acc {correct / n:.4f} "
              f"adv_mlm_loss {adv_loss / batches:.4f} adv_masked_acc {adv_correct / n:.4f}", flush=True)


if __name__ == "__main__":
    main()
