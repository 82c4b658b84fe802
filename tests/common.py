"""Shared by the test workers (which run our code on 2 ranks) and the tests (which compute the
independent references): a small real data set, a small model, and hand-written training loops
in plain PyTorch that know nothing of conadv_ds or DeepSpeed."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

WORLD = 2
MICRO = 8
LR = 0.05
MOMENTUM = 0.9
EPS = 0.1
STEP = 0.05


def digits_batches(n_steps: int, gas: int = 1, seed: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, per micro-batch index: the *global* micro-batch (WORLD × MICRO samples of
    scikit-learn's 8×8 digits in [0, 1]); rank r trains on rows [r·MICRO, (r+1)·MICRO)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    per = WORLD * MICRO
    out, k = [], 0
    for _ in range(n_steps):
        step = []
        for _ in range(gas):
            idx = order[k * per:(k + 1) * per]
            step.append((x[idx], y[idx]))
            k += 1
        out.append(step)
    return out


def rank_slice(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO]


class SmallCNN(nn.Module):
    """Conv + BatchNorm + a linear head, big enough for ZeRO-3 to shard every tensor."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def make_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN()


def ds_config(stage: int, gas: int = 1, conadv: dict | None = None, **zero) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": MOMENTUM}},
        "zero_optimization": {"stage": stage, **zero},
        "steps_per_print": 10 ** 9,
    }
    if conadv is not None:
        cfg["conadv"] = conadv
    return cfg


# Deterministic attacks so that the reference needs no access to the attack's random stream:
# untargeted, always starting from δ = 0.
DETERMINISTIC = {"epsilon": EPS, "step_size": STEP, "steps": 2, "targeted": False, "clean_start_prob": 1.0,
                 "adv_weight": 0.5, "clip_range": [0.0, 1.0], "attack_bn": "train"}


def reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """L∞ untargeted PGD from δ = 0 with x+δ clipped to [0, 1]; BatchNorm in train mode with
    its running statistics restored afterwards."""
    saved = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
    model.train()
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta + STEP * g.sign()).clamp(-EPS, EPS)
            delta = (x + delta).clamp(0, 1) - x
    model.load_state_dict(saved, strict=False)
    return delta.detach()


def reference_train(steps: list, mode: str, tau: int = 0, lam: float = 0.5, seed: int = 0,
                    record: list | None = None) -> list[torch.Tensor]:
    """Plain-PyTorch data-parallel training, one process emulating WORLD ranks.

    mode: "clean", or "adv" where δ_t of every rank's micro-batch is PGD against the weights
    w_{max(t-tau, 0)} (tau = 0: DisAdv). Loss (1-lam)·CE(x) + lam·CE(x+δ) per rank and
    micro-batch; the gradient is their mean. SGD with momentum. Returns the final parameters.
    """
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    history = []  # copies of the weights after each step: history[s] = w_s
    for t, micro_batches in enumerate(steps):
        history.append(copy.deepcopy(model.state_dict()))
        deltas = {}
        if mode == "adv":
            attacker = copy.deepcopy(model)
            src = history[max(t - tau, 0)]
            attacker.load_state_dict({k: v for k, v in src.items() if "running" not in k and "num_batches" not in k}
                                     | {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
            for m, mb in enumerate(micro_batches):
                for r in range(WORLD):
                    x, y = rank_slice(mb, r)
                    deltas[m, r] = reference_pgd(attacker, x, y)
            if record is not None:
                record.append(deltas)
        opt.zero_grad()
        n = len(micro_batches) * WORLD
        for m, mb in enumerate(micro_batches):
            for r in range(WORLD):
                x, y = rank_slice(mb, r)
                if mode == "adv":
                    loss = (1 - lam) * F.cross_entropy(model(x), y) + lam * F.cross_entropy(model(x + deltas[m, r]), y)
                else:
                    loss = F.cross_entropy(model(x), y)
                (loss / n).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def counting_host_syncs(outside: tuple[str, ...] = ()):
    """`conadv_ds.syncs.SyncCounter` on the suite's device (the CPU): the calls that would make
    the host wait for a GPU."""
    from conadv_ds.syncs import SyncCounter

    return SyncCounter("cpu", outside)
