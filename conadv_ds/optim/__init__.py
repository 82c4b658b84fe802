"""Optimizers and LR schedules that conadv_ds builds from the DeepSpeed JSON.

    "optimizer": {"type": "LARS", "params": {"lr": 10.0, "momentum": 0.92, "weight_decay": 5e-5}},
    "scheduler": {"type": "WarmupPolyDecay", "params": {"warmup_num_steps": 534, "total_num_steps": 1301,
                                                        "power": 1.6}},
    "lr_scaling": {"rule": "linear", "reference_batch_size": 256}

LARS and LAMB (exact per-layer trust ratios under ZeRO 0-3) and WarmupPolyDecay are ours;
every other optimizer or scheduler type is DeepSpeed's and reaches it unchanged. `lr_scaling`
multiplies the configured learning rates by B/ref (linear) or √(B/ref) (sqrt), B the resolved
train_batch_size, so that one config follows the batch size.
"""

from .factory import bind_to_engine, build_optimizer, build_scheduler, prepare_ds_config
from .layerwise import LAMB, LARS, param_groups
from .schedules import WarmupPolyDecay

__all__ = ["LARS", "LAMB", "WarmupPolyDecay", "prepare_ds_config", "build_optimizer", "build_scheduler",
           "bind_to_engine", "param_groups"]
