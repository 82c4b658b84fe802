#!/usr/bin/env bash
# GPU check: every front end for a few steps on CUDA, before a release or after any change to
# collectives, devices, precision or the split transport; then benchmarks/gpu_throughput.py.
#
#   scripts/gpu_check.sh [--wheels DIR]
#
# --wheels DIR: first install, offline, what the project needs beyond torch, torchvision,
# transformers, accelerate and timm (DeepSpeed, datasets, pydantic, ...: DIR from
# scripts/wheelhouse.sh) and the project itself (editable, from this tree), leaving the installed
# torch, torchvision, transformers, accelerate and timm as they are (a constraints file pins them).
#
# On one GPU every case runs at world size 1 (NCCL cannot put two ranks on one device; ZeRO-2/3
# run at world size 1): the vision demo (ZeRO-2, lookahead ConAdv), a sharded snapshot at τ=2
# under ZeRO-3, the BERT recipe under accelerate + ZeRO-3, the Hugging Face Trainer on the BERT it
# just pretrained, the fp16 loss-scaler overflow case, ε → 0 training like clean, and the
# throughput benchmark. With 2+ GPUs the 2-rank cases follow (vision, split, BERT, Trainer, fp16).
# A failed case does not stop the others: each prints ok or FAILED with its log; the last line is
# `gpu_check: K/N passed`, exit status 0 when K = N, else 1. Without a CUDA GPU: exit 2 at once,
# nothing installed or run.
set -uo pipefail

wheels=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="${2:?--wheels needs a directory}"; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (usage: scripts/gpu_check.sh [--wheels DIR])" >&2; exit 2 ;;
    esac
done

gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null) || gpus=0
case "$gpus" in ''|*[!0-9]*) gpus=0 ;; esac
if [ "$gpus" -lt 1 ]; then
    echo "gpu_check: needs a CUDA GPU (torch.cuda.device_count() is $gpus); nothing installed or run" >&2
    exit 2
fi
if [ -n "$wheels" ]; then
    if [ ! -d "$wheels" ]; then
        echo "gpu_check: --wheels $wheels: not a directory (make one with scripts/wheelhouse.sh)" >&2
        exit 2
    fi
    wheels=$(cd "$wheels" && pwd)
fi
cd "$(dirname "$0")/.."

out=$(mktemp -d -t gpu_check.XXXXXX)
echo "gpu_check: $gpus GPU(s); logs in $out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ -n "$wheels" ]; then
    python - > "$out/constraints.txt" <<'PY'
from importlib import metadata

for name in ("torch", "torchvision", "transformers", "accelerate", "timm"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
    # PIP_BREAK_SYSTEM_PACKAGES: GPU images often keep their packages in the system Python.
    if ! PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install --no-index --find-links "$wheels" \
            -c "$out/constraints.txt" -e . > "$out/install.log" 2>&1; then
        echo "gpu_check: installing from $wheels failed (log: $out/install.log)" >&2
        exit 1
    fi
    echo "gpu_check: installed from $wheels (log: $out/install.log)"
fi

free_port() {
    python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

passed=0
total=0
# run_case NAME LOG SECONDS COMMAND...: run COMMAND with its output in LOG, killed (with every
# process it started) after SECONDS.
run_case() {
    local name=$1 log=$2 limit=$3 start=$SECONDS rc=0
    shift 3
    total=$((total + 1))
    timeout -k 10 "$limit" "$@" > "$log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "gpu_check: ok     $name ($((SECONDS - start)) s)"
    else
        echo "gpu_check: FAILED $name (exit $rc after $((SECONDS - start)) s; log: $log)"
    fi
}

# Configs for world size 1: the vision demo under ZeRO-3; the BERT ZeRO-3 demo with its batch of
# 32 made of 2 accumulated micro-batches of 16 (the JSON's accumulation 1 fits 2 ranks).
python - "$out" <<'PY'
import json
import sys

out = sys.argv[1]
vision = json.load(open("ds_configs/demo.json"))
vision["zero_optimization"] = {"stage": 3}
json.dump(vision, open(f"{out}/demo_zero3.json", "w"), indent=2)
bert = json.load(open("ds_configs/bert_demo_zero3.json"))
bert["gradient_accumulation_steps"] = bert["train_batch_size"] // bert["train_micro_batch_size_per_gpu"]
json.dump(bert, open(f"{out}/bert_demo_zero3_1gpu.json", "w"), indent=2)
PY

cat > "$out/fp16_check.py" <<'PY'
"""fp16 overflow: a step the loss scaler skips neither reuses nor loses a micro-batch or its δ."""
import torch
import torch.nn as nn

import conadv_ds

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
       "fp16": {"enabled": True, "initial_scale_power": 32, "loss_scale_window": 2},
       "zero_optimization": {"stage": 2},  # DeepSpeed scales the loss for its ZeRO optimizers
       "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
       "conadv": {"schedule": "conadv", "staleness": 1, "epsilon": 0.05, "step_size": 0.05, "clip_range": None}}
engine, *_ = conadv_ds.initialize(model=model, config=cfg)
g = torch.Generator().manual_seed(engine.global_rank)
batches = [(torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(40)]
trained = []
prepare = engine.schedule.prepare


def recording(step, pull):
    prepared = prepare(step, pull)
    trained.extend(float(b[0].float().sum()) for b, _ in prepared)
    return prepared


engine.schedule.prepare = recording
data = iter(batches)
for _ in range(12):
    engine.train_batch(data)
assert engine.skipped_steps > 0, "no overflow happened: raise initial_scale_power"
expected = [float(b[0].half().float().sum()) for b in batches[:len(trained)]]
assert torch.allclose(torch.tensor(trained), torch.tensor(expected), rtol=1e-4), "a micro-batch trained twice or skipped"
print(f"fp16 ok: {engine.skipped_steps} skipped steps, {len(trained)} micro-batches each trained once")
PY

cat > "$out/epsilon_check.py" <<'PY'
"""ε → 0 trains like clean on the device: ConAdv with ε = 1e-12 ends a few steps with the weights
of conadv off; ε = 0.1 does not (so the comparison can tell)."""
import torch
import torch.nn as nn

import conadv_ds

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def train(conadv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
           "steps_per_print": 10 ** 9, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
           "conadv": conadv}
    engine, *_ = conadv_ds.initialize(model=model, config=cfg)
    assert engine.device.type == "cuda", f"engine on {engine.device}"
    g = torch.Generator().manual_seed(1)
    data = iter([(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
                 for _ in range(12)])
    metrics = [engine.train_batch(data) for _ in range(5)]
    return torch.cat([p.detach().float().flatten().cpu() for p in engine.module.parameters()]), metrics[-1]


clean, _ = train({"enabled": False})
tiny, metrics = train({"schedule": "conadv", "staleness": 1, "epsilon": 1e-12, "step_size": 1e-12})
large, _ = train({"schedule": "conadv", "staleness": 1, "epsilon": 0.1, "step_size": 0.1})
assert "adv_loss" in metrics, f"the ε = 1e-12 run was not adversarial: {metrics}"
tiny_diff, large_diff = (tiny - clean).abs().max().item(), (large - clean).abs().max().item()
assert tiny_diff <= 1e-6, f"ε = 1e-12 moved the weights by {tiny_diff:.3g} from clean training"
assert large_diff > 1e-4, f"ε = 0.1 left the weights within {large_diff:.3g} of clean training"
print(f"epsilon ok: max |w(ε=1e-12) - w(clean)| = {tiny_diff:.3g}, max |w(ε=0.1) - w(clean)| = {large_diff:.3g}")
PY

run_case "vision demo, 1 GPU (ZeRO-2, lookahead ConAdv)" "$out/vision1.log" 300 \
    python -m deepspeed.launcher.runner --num_gpus 1 --master_port "$(free_port)" recipes/resnet_imagenet.py \
    --deepspeed_config ds_configs/demo.json --max_steps 20 --output_dir "$out/vision1"
run_case "vision snapshot τ=2, 1 GPU (ZeRO-3)" "$out/snapshot1.log" 300 \
    python -m deepspeed.launcher.runner --num_gpus 1 --master_port "$(free_port)" recipes/resnet_imagenet.py \
    --deepspeed_config "$out/demo_zero3.json" --conadv staleness=2 --max_steps 20 --output_dir "$out/snapshot1"
run_case "BERT recipe, 1 GPU (accelerate, ZeRO-3)" "$out/bert1.log" 300 \
    python -m accelerate.commands.launch --num_processes 1 --main_process_port "$(free_port)" --use_deepspeed \
    --deepspeed_config_file "$out/bert_demo_zero3_1gpu.json" recipes/bert_pretrain.py --max_steps 10 \
    --output_dir "$out/bert1"
run_case "Hugging Face Trainer, 1 GPU (on that BERT)" "$out/trainer1.log" 300 \
    python -m torch.distributed.run --nproc_per_node 1 --master_port "$(free_port)" recipes/trainer_finetune.py \
    --max_steps 10 --output_dir "$out/trainer1" --model_dir "$out/bert1/model" --tokenizer_dir "$out/bert1/tokenizer" \
    --corpus help-topics
run_case "fp16 overflow, 1 GPU: a skipped step neither reuses nor loses a delta" "$out/fp16_1.log" 180 \
    python -m torch.distributed.run --nproc_per_node 1 --master_port "$(free_port)" "$out/fp16_check.py"
run_case "ε → 0 trains like clean, 1 GPU" "$out/epsilon1.log" 180 \
    python -m torch.distributed.run --nproc_per_node 1 --master_port "$(free_port)" "$out/epsilon_check.py"
run_case "throughput (benchmarks/gpu_throughput.py)" "$out/throughput.log" 420 \
    python benchmarks/gpu_throughput.py

if [ "$gpus" -ge 2 ]; then
    run_case "vision demo, 2 GPUs (ZeRO-2, lookahead ConAdv)" "$out/vision2.log" 300 \
        python -m deepspeed.launcher.runner --num_gpus 2 --master_port "$(free_port)" recipes/resnet_imagenet.py \
        --deepspeed_config ds_configs/demo.json --max_steps 20 --output_dir "$out/vision2"
    run_case "split demo, 2 GPUs (1 trainer + 1 attacker)" "$out/split2.log" 300 \
        python -m deepspeed.launcher.runner --num_gpus 2 --master_port "$(free_port)" recipes/resnet_imagenet.py \
        --deepspeed_config ds_configs/demo_split.json --max_steps 20 --output_dir "$out/split2"
    run_case "BERT recipe, 2 GPUs (accelerate, ZeRO-3)" "$out/bert2.log" 300 \
        python -m accelerate.commands.launch --num_processes 2 --main_process_port "$(free_port)" --use_deepspeed \
        --deepspeed_config_file ds_configs/bert_demo_zero3.json recipes/bert_pretrain.py --max_steps 10 \
        --output_dir "$out/bert2"
    run_case "Hugging Face Trainer, 2 GPUs (torchrun)" "$out/trainer2.log" 300 \
        python -m torch.distributed.run --nproc_per_node 2 --master_port "$(free_port)" recipes/trainer_finetune.py \
        --max_steps 10 --output_dir "$out/trainer2" --model_dir "$out/bert2/model" \
        --tokenizer_dir "$out/bert2/tokenizer" --corpus help-topics
    run_case "fp16 overflow, 2 GPUs" "$out/fp16_2.log" 180 \
        python -m torch.distributed.run --nproc_per_node 2 --master_port "$(free_port)" "$out/fp16_check.py"
fi

if [ -f "$out/throughput.log" ]; then
    grep -E '^\||^conadv/clean=' "$out/throughput.log"
fi
echo "gpu_check: $passed/$total passed"
[ "$passed" -eq "$total" ]
