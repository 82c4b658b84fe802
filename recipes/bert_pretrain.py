"""BERT masked-LM pretraining with embedding-space ConAdv, launched by `accelerate launch`.

    accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file ds_configs/bert_demo.json \\
        recipes/bert_pretrain.py --max_steps 30 --output_dir runs/bert           # DeepSpeed ZeRO-2 (or _zero3)
    accelerate launch --num_processes 2 recipes/bert_pretrain.py --deepspeed_config ds_configs/bert_demo.json \\
        --max_steps 30 --output_dir runs/bert_ddp                                 # plain DDP, same JSON

    accelerate launch --config_file cfg.yaml recipes/bert_pretrain.py --deepspeed_config ds_configs/bert_demo.json

The JSON's `conadv`, optimizer (LAMB), scheduler (WarmupPolyDecay) and `lr_scaling` blocks are
read here; DeepSpeed gets the rest, merged with the user's accelerate configuration (ZeRO stage,
gradient accumulation, clipping, offload, mixed precision, zero3 init): a value set in only one
of the two places is taken from there, one set differently in both is an error. δ lives on the
word-embedding output (padding never perturbed) and, with τ = 1, is computed while the previous
step's weights are in place.

With `"schedule": "split"` the last `attacker_ranks` launched ranks attack (embedding-space δ of
step t+τ from the trainers' w_t) instead of training; they need `--tokenizer_dir` or `--model_dir`.

Checkpoints (`--save_interval`, and at the end) go to `<output_dir>/checkpoints/step<N>` through
accelerate's `save_state` (weights, optimizer, the LR schedule, every process's RNG streams)
plus each rank's data position and ConAdv state, written crash-safe as the engine's are
(`conadv_ds.checkpoint`); `--resume` continues from the newest one bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from conadv_ds.cli import count, one_line_errors, parse_overrides, positive, run_launched
from conadv_ds.config import JsonBlock, load_json, validate_block
from conadv_ds.errors import ConfigError
from conadv_ds.resolve import RunConfig, resolve_config


class BertRecipe(JsonBlock):
    """The JSON's optional `recipe` block: defaults for the flags of the same names."""

    model_size: Literal["tiny", "mini", "small", "base", "large"] = "tiny"
    max_seq_length: int = 128
    max_steps: int = 100
    phase2_seq_length: Optional[int] = None
    phase2_steps: int = 0
    max_predictions_per_seq: Optional[int] = None
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
    p.add_argument("--tokenizer_dir", help="a saved tokenizer; default: a WordPiece vocabulary built from the corpus")
    p.add_argument("--vocab_size", type=int, default=3000)
    p.add_argument("--train_files", nargs="*", help="text files (one text per line)")
    p.add_argument("--dataset_dir", help="a `datasets` dataset saved with save_to_disk (column 'text')")
    p.add_argument("--strict_data", action="store_true", help="stop at the first empty line instead of skipping it")
    p.add_argument("--cache_dir", help="datasets cache folder (default: datasets' own, HF_DATASETS_CACHE)")
    p.add_argument("--preprocessing_num_workers", type=count, help="processes for tokenization and packing")
    p.add_argument("--max_seq_length", type=int)
    p.add_argument("--max_predictions_per_seq", type=int, help="at most this many masked tokens per sequence "
                   "(BERT's LAMB recipe: 20 at 128; phase 2 scales it by the length, 80 at 512)")
    p.add_argument("--phase2_seq_length", type=int, help="second phase sequence length (LAMB's 128 then 512)")
    p.add_argument("--phase2_steps", type=count)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max_steps", type=count)
    p.add_argument("--output_dir", default="runs/bert")
    p.add_argument("--resume", action="store_true", help="continue from output_dir's newest checkpoint (if any)")
    p.add_argument("--save_interval", type=count, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--save_total_limit", type=count, default=3,
                   help="keep the newest N checkpoints (0: keep all); the latest is never deleted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_interval", type=positive, default=10)
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
    merged_accelerate_config: bool = False
    """The accelerate config's DeepSpeed fields were merged into `run.ds` (no deepspeed_config_file)."""


ACCELERATE_DEEPSPEED = {  # accelerate config field: (the variable `accelerate launch` sets, DeepSpeed key, type)
    "zero_stage": ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "zero_optimization.stage", int),
    "gradient_accumulation_steps": ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps", int),
    "gradient_clipping": ("ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", float),
    "offload_optimizer_device": ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                                 "zero_optimization.offload_optimizer.device", str),
    "offload_param_device": ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                             "zero_optimization.offload_param.device", str),
    "zero3_save_16bit_model": ("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
                               "zero_optimization.stage3_gather_16bit_weights_on_model_save", bool),
}


def merge_accelerate_config(raw: dict, path: str, env=os.environ) -> None:
    """Put the user's accelerate DeepSpeed settings (`accelerate config` YAML or launch flags,
    which `accelerate launch` hands over as ACCELERATE_* variables) into the JSON's DeepSpeed
    block, in place. Zero3 init is read by accelerate itself. A value the JSON sets differently
    is a one-line error naming both; mixed precision must agree with the JSON's fp16/bf16.
    Gradient accumulation 1 (what `accelerate config` writes unless asked) leaves a JSON that
    derives it from train_batch_size and the micro-batch alone."""
    def parse(value: str, kind):
        return value.lower() == "true" if kind is bool else kind(value)

    derived_gas = "gradient_accumulation_steps" not in raw and {"train_batch_size",
                                                                 "train_micro_batch_size_per_gpu"} <= raw.keys()
    for field, (var, key, kind) in ACCELERATE_DEEPSPEED.items():
        if var not in env:
            continue
        if field == "gradient_accumulation_steps" and derived_gas and parse(env[var], kind) == 1:
            continue  # `accelerate config` always writes 1; the JSON derives it from the batch sizes
        value = parse(env[var], kind)
        *parents, leaf = key.split(".")
        node = raw
        for k in parents:
            node = node.setdefault(k, {})
        ours = node.get(leaf, "auto")
        if ours != "auto" and ours != value:
            raise ConfigError(f"{field}={value!r} in the accelerate config but {key}={ours!r} in {path}; "
                              "set it in one place")
        node[leaf] = value
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    for dtype, on in (("fp16", precision == "fp16"), ("bf16", precision in ("bf16", "fp8"))):
        ours = (raw.get(dtype) or {}).get("enabled", "auto")
        if precision != "no" and ours != "auto" and bool(ours) != on:
            raise ConfigError(f"mixed_precision={precision!r} in the accelerate config but {dtype}.enabled={ours!r} "
                              f"in {path}; set it in one place")


def make_plan(args: argparse.Namespace) -> Plan:
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    from_accelerate = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if use_deepspeed else None
    if args.deepspeed_config and from_accelerate and Path(args.deepspeed_config).resolve() != \
            Path(from_accelerate).resolve():
        raise ConfigError(f"--deepspeed_config={args.deepspeed_config!r} but accelerate's deepspeed_config_file="
                          f"{from_accelerate!r}; pass one of them")
    path = args.deepspeed_config or from_accelerate
    if not path:
        raise ConfigError("no config: pass --deepspeed_config or launch with accelerate's --deepspeed_config_file")
    world = args.world_size if args.dry_run and args.world_size else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1:
        raise ConfigError(f"--world_size={world}: must be >= 1")
    raw = load_json(path)
    recipe = validate_block(BertRecipe, raw.pop("recipe", {}), "recipe")
    for key in ("model_size", "max_seq_length", "max_steps", "phase2_seq_length", "phase2_steps",
                "max_predictions_per_seq"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(recipe, key))
    if args.max_predictions_per_seq is not None and args.max_predictions_per_seq < 1:
        raise ConfigError(f"--max_predictions_per_seq={args.max_predictions_per_seq}: must be >= 1")
    if args.phase2_steps and not args.phase2_seq_length:
        raise ConfigError(f"--phase2_steps={args.phase2_steps}: needs --phase2_seq_length "
                          "(or recipe.phase2_seq_length)")
    if args.phase2_steps > args.max_steps:
        raise ConfigError(f"--phase2_steps={args.phase2_steps}: must be <= max_steps ({args.max_steps})")
    if not args.phase2_steps:
        args.phase2_seq_length = None  # no second phase: nothing is packed or sized for its length
    merged = use_deepspeed and not from_accelerate
    if merged:
        merge_accelerate_config(raw, path)
    overrides = parse_overrides(args.conadv)
    if use_deepspeed and (raw.get("zero_optimization") or {}).get("stage") == 3:
        gather = "stage3_gather_16bit_weights_on_model_save"
        if raw["zero_optimization"].get(gather, "auto") == "auto":  # accelerate's default: the YAML's, else true
            yaml = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")
            raw["zero_optimization"][gather] = yaml.lower() == "true"
        if raw["zero_optimization"][gather] is not True:
            raise ConfigError(f"zero_optimization.{gather}={raw['zero_optimization'][gather]!r}: the final model is "
                              "saved with save_pretrained, which needs it true under ZeRO-3 (zero3_save_16bit_model "
                              "in the accelerate config)")
    run = resolve_config(raw, overrides, world)
    if run.layout is not None:
        if not use_deepspeed:
            raise ConfigError("conadv.schedule='split': needs DeepSpeed (accelerate launch --use_deepspeed): the "
                              "trainers send their ZeRO shards of the weights to the attacker ranks")
        if not (args.tokenizer_dir or args.model_dir):
            raise ConfigError("conadv.schedule='split': pass --tokenizer_dir (or --model_dir): attacker ranks build "
                              "the model without reading the corpus, so the vocabulary must exist before the run")
    if run.conadv.adversarial and run.conadv.space == "pixel":
        raise ConfigError("conadv.space='pixel': this recipe perturbs word embeddings; set 'embedding' or 'auto'")
    if run.optimizer is None:
        raise ConfigError(f"optimizer: {path} must use type 'LAMB' or 'LARS' (built by conadv_ds)")
    for f in args.train_files or []:
        if not Path(f).is_file():
            raise ConfigError(f"--train_files: {f!r} not found")
    return Plan(run, use_deepspeed, merged)


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
    import datasets
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs
    from accelerate.utils import DeepSpeedPlugin
    from tqdm import tqdm
    from transformers import BertForMaskedLM

    from conadv_ds import batch as B
    from conadv_ds import checkpoint as ckpt
    from conadv_ds import optim
    from conadv_ds.data import text
    from conadv_ds.fingerprint import weights_sha256
    from conadv_ds.objective import Objective, StepMetrics
    from conadv_ds.perturb import resolve_space
    from conadv_ds.schedule import Pull, build_schedule

    run, use_deepspeed = plan.run, plan.use_deepspeed
    conadv, micro, gas = run.conadv, run.batch.micro_batch_per_rank, run.batch.gradient_accumulation_steps
    if run.layout is not None:  # schedule 'split': the trainers get a world of their own, before accelerate's
        from conadv_ds.split.link import connect

        if connect(run.layout).is_attacker:
            return serve_trainers(args, run)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out, saves = Path(args.output_dir), Path(args.output_dir) / "checkpoints"
    torch.manual_seed(args.seed)
    # On CPU accelerate needs to be told gloo and, without DeepSpeed, cpu=True: otherwise it takes
    # each process for a run of its own and never wraps the model in DDP.
    launched = world > 1 and not torch.cuda.is_available()
    if plan.merged_accelerate_config:
        # The accelerate config's DeepSpeed fields are in run.ds now (make_plan): accelerate's check
        # that a DeepSpeed JSON would make them ignored does not apply.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    accelerator = Accelerator(cpu=launched and not use_deepspeed,
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched else [],
                              deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=run.ds) if use_deepspeed else None,
                              gradient_accumulation_steps=1 if use_deepspeed else gas)
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()
    with accelerator.main_process_first():  # the main process tokenizes; the others read its cache
        data = load_data(args, out, accelerator.is_main_process)
    tokenizer, blocks = data["tokenizer"], data["blocks"]
    if data["skipped"] and rank == 0:
        print(f"skipped {data['skipped']} empty lines of the corpus", flush=True)
    for length, packed in sorted(blocks.items()):  # each phase's packing must fill one step
        if len(packed) < micro * gas * world:
            raise ConfigError(f"train_batch_size={micro * gas * world} is larger than the corpus "
                              f"({len(packed)} sequences of {length} tokens); point --train_files or "
                              "--dataset_dir at a bigger corpus, or use ds_configs/bert_demo.json")
    model = BertForMaskedLM.from_pretrained(args.model_dir) if args.model_dir else new_model(args, len(tokenizer))
    optimizer = optim.build_optimizer(run.optimizer, model)
    scheduler = optim.build_scheduler(run.scheduler, optimizer) if run.scheduler else None
    # The scheduler stays ours: stepped once per optimizer step below (accelerate would step it
    # once per process, DeepSpeed once per engine step: neither is the schedule's unit); it is
    # registered so that save_state / load_state carry it.
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)
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
        params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())  # ZeRO-3: partitioned
        print(f"{'deepspeed' if use_deepspeed else 'ddp'} on {world} ranks, {data['texts']} texts, "
              f"vocab {len(tokenizer)}, {params / 1e6:.2f}M parameters", flush=True)

    phase2_from = args.max_steps - args.phase2_steps if args.phase2_seq_length else None
    phases = [(blocks[args.max_seq_length], collator(args, tokenizer, args.max_seq_length), 0)]
    if phase2_from is not None:
        phases.append((blocks[args.phase2_seq_length], collator(args, tokenizer, args.phase2_seq_length),
                       phase2_from * gas))
    stream = text.MLMStream(phases, micro, rank, world, args.seed)
    held = text.masked_batches(data["held"], 32, collator(args, tokenizer, args.max_seq_length), seed=1)
    identity = ckpt.run_identity(conadv.model_dump(), world)

    def save(step: int) -> None:
        """accelerate's save_state plus this rank's data position and ConAdv state (pending
        lookahead batches and δ, or old-weight shards: different on every rank, which
        register_for_checkpointing's one main-process copy cannot hold), into `<tag>.partial`,
        published once every rank is done (`checkpoint.save_folder`, as ConAdvEngine's)."""

        def write(partial: Path) -> None:
            accelerator.save_state(str(partial))
            ckpt.atomic_save({"step": step, "data": stream.state_dict(), "schedule": schedule.state_dict(),
                              **identity}, partial / f"conadv_rank{rank}.pt")

        ckpt.save_folder(saves, f"step{step}", accelerator.is_main_process, accelerator.wait_for_everyone, write,
                         identity, keep=args.save_total_limit or None)

    start_step = 0
    if args.resume:
        tag = ckpt.open_folder(saves, None, accelerator.is_main_process, accelerator.wait_for_everyone, identity)
        if tag is not None:
            ckpt.check_files(saves / tag)  # ours and DeepSpeed's, before anything is loaded
            if use_deepspeed:
                ckpt.use_safe_loading(engine)
            state = ckpt.load_state(saves / tag / f"conadv_rank{rank}.pt")
            ckpt.check_same_run(state, identity, str(saves / tag))
            accelerator.load_state(str(saves / tag))
            schedule.load_state_dict(B.to_device(state["schedule"], accelerator.device))
            stream.load_state_dict(state["data"])
            start_step = state["step"]
            if rank == 0:
                print(f"resumed from {saves / tag}", flush=True)

    def forward(batch):
        output = model(**batch)
        return output.loss, output

    records = {"weights": [], "steps": []}
    stats = StepMetrics()
    bar = tqdm(total=args.max_steps, initial=start_step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    t0, tokens = time.time(), torch.zeros((), dtype=torch.int64, device=accelerator.device)
    pull = Pull(lambda: [B.to_device(next(stream), accelerator.device) for _ in range(gas)], stream)
    for step in range(start_step, args.max_steps):
        if step < args.record_deltas:
            records["weights"].append(_full_state(module))
        start = time.perf_counter()
        batches = schedule.prepare(step, pull)
        for batch, delta in batches:
            with accelerator.accumulate(model):
                micro_step = objective(forward, batch, delta)
                accelerator.backward(micro_step.loss)
                optimizer.step()
                optimizer.zero_grad()
            stats.add(micro_step.stats)
            tokens += batch["attention_mask"].sum()  # on the device: read once, at the end
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
        if args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < args.max_steps:
            save(step + 1)
        if args.eval_interval and (step + 1) % args.eval_interval == 0 and step + 1 < args.max_steps:
            evaluate(module, held, space, eval_attack, accelerator, f"step {step + 1}")
    bar.close()
    schedule.stop(args.max_steps)  # split: the attacker ranks leave
    elapsed = time.time() - t0
    evaluate(module, held, space, eval_attack, accelerator, "final")
    if start_step < args.max_steps:
        save(args.max_steps)
    sha = weights_sha256(module)
    state = accelerator.get_state_dict(model)
    if args.record_deltas:  # every rank: its own batches; the weights are the same everywhere
        torch.save({**records, "config": module.config.to_dict(), "conadv": conadv.model_dump()},
                   out / f"deltas_rank{rank}.pt")
    if rank == 0:
        module.save_pretrained(str(out / "model"), state_dict=state)
        print(f"trained {args.max_steps - start_step} steps in {elapsed:.1f} s, "
              f"{int(tokens) / max(elapsed, 1e-9):.0f} tokens/s per rank; checkpoint {saves / f'step{args.max_steps}'}",
              flush=True)
        print(f"weights_sha256={sha}", flush=True)


def serve_trainers(args: argparse.Namespace, run) -> None:
    """An attacker rank of schedule 'split': holds the trainers' weights of step t and sends them
    the δ of step t+τ, until they stop; it reads no data and joins none of accelerate's groups."""
    from transformers import BertForMaskedLM, PreTrainedTokenizerFast

    from conadv_ds.perturb import resolve_space
    from conadv_ds.split.attacker import SplitAttacker

    if args.model_dir:
        model = BertForMaskedLM.from_pretrained(args.model_dir)
    else:
        model = new_model(args, len(PreTrainedTokenizerFast.from_pretrained(args.tokenizer_dir)))
    attacker = SplitAttacker(model, resolve_space(run.conadv, model), run.conadv, run.ds)
    while True:
        try:
            attacker.train_batch()
        except StopIteration:
            return


def load_data(args: argparse.Namespace, out: Path, main: bool) -> dict:
    """Corpus, tokenizer and packed blocks through `datasets` (cached: run first by the main
    process, then by the others, which read its cache). The main process builds the tokenizer
    (deterministic: the same corpus gives the same vocabulary in any run) into
    `<output_dir>/tokenizer`, which the other ranks and a resumed run load."""
    from transformers import PreTrainedTokenizerFast

    from conadv_ds.data import text

    corpus = text.read_corpus(args.train_files, args.dataset_dir, strict=args.strict_data, cache_dir=args.cache_dir)
    train_texts, held_texts = text.train_heldout_split(corpus.dataset)
    saved = out / "tokenizer"
    if args.tokenizer_dir:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer_dir)
    elif main and not (args.resume and saved.is_dir()):
        tokenizer = text.train_tokenizer(train_texts, args.vocab_size, saved)
    else:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(saved))
    lengths = {args.max_seq_length, args.phase2_seq_length or args.max_seq_length}
    workers = args.preprocessing_num_workers or None
    blocks = {n: text.tokenize_and_group(train_texts, tokenizer, n, workers) for n in lengths}
    held = text.tokenize_and_group(held_texts, tokenizer, args.max_seq_length, workers)
    return {"tokenizer": tokenizer, "blocks": blocks, "held": held, "texts": len(train_texts),
            "skipped": corpus.skipped}


def collator(args: argparse.Namespace, tokenizer, seq_len: int):
    """Masking for sequences of `seq_len` tokens; the cap on predictions scales with the length."""
    from conadv_ds.data import text

    cap = args.max_predictions_per_seq
    return text.MaskedLM(tokenizer, max_predictions=None if cap is None else
                         max(1, round(cap * seq_len / args.max_seq_length)))


def new_model(args: argparse.Namespace, vocab_size: int):
    from transformers import BertConfig, BertForMaskedLM

    hidden, layers, heads, inter = SIZES[args.model_size]
    longest = max(args.max_seq_length, args.phase2_seq_length or 0)
    return BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=inter,
                                      max_position_embeddings=longest, hidden_dropout_prob=args.dropout,
                                      attention_probs_dropout_prob=args.dropout))


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
    run_launched(main)
