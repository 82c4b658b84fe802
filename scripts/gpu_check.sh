#!/usr/bin/env bash
# GPU check: run on a machine with >= 2 CUDA GPUs and NCCL, after `pip install -e .`, before a
# release or after any change to collectives, devices or the split transport. Runs each front end
# for a few steps on 2 GPUs and the fp16 loss-scaler overflow case; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -lt 2 ]; then
    echo "gpu_check: needs >= 2 CUDA GPUs, found $gpus" >&2
    exit 2
fi
out=$(mktemp -d)
trap 'echo "gpu_check: FAILED at: $step (logs in $out)" >&2' ERR

step="vision demo (ZeRO-2, lookahead ConAdv)"
deepspeed --num_gpus 2 recipes/resnet_imagenet.py --deepspeed_config ds_configs/demo.json --max_steps 20 \
    --output_dir "$out/vision" > "$out/vision.log" 2>&1

step="split demo (1 trainer + 1 attacker)"
deepspeed --num_gpus 2 recipes/resnet_imagenet.py --deepspeed_config ds_configs/demo_split.json --max_steps 20 \
    --output_dir "$out/split" > "$out/split.log" 2>&1

step="BERT recipe (accelerate, ZeRO-3)"
accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file ds_configs/bert_demo_zero3.json \
    recipes/bert_pretrain.py --max_steps 10 --output_dir "$out/bert" > "$out/bert.log" 2>&1

step="Hugging Face Trainer (torchrun)"
torchrun --nproc_per_node 2 recipes/trainer_finetune.py --max_steps 10 --output_dir "$out/trainer" \
    --model_dir "$out/bert/model" --tokenizer_dir "$out/bert/tokenizer" --corpus help-topics > "$out/trainer.log" 2>&1

step="fp16 overflow: a skipped step neither reuses nor loses a delta"
cat > "$out/fp16_check.py" <<'PY'
import torch, torch.nn as nn, torch.nn.functional as F
import conadv_ds
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
       "fp16": {"enabled": True, "initial_scale_power": 32, "loss_scale_window": 2},
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
torchrun --nproc_per_node 2 "$out/fp16_check.py" > "$out/fp16.log" 2>&1

trap - ERR
echo "gpu_check: all passed (logs in $out)"
