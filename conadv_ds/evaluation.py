"""Clean and robust evaluation, summed over ranks on the device: image classifiers under pixel
PGD, and text models under embedding-space PGD."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adversary import Adversary
from .attacks import pgd
from .batch import IGNORE_INDEX, default_loss, to_device
from .batch import correct as correct_of
from .bn import attack_bn_mode
from .config import ConAdvConfig
from .perturb import resolve_space
from .reduce import all_reduce_sum


@torch.no_grad()
def _topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return ((logits.topk(k, dim=-1).indices == y[:, None]).any(dim=-1) & (y != IGNORE_INDEX)).sum()


def evaluate(module: nn.Module, loader, epsilon: float, steps: int, step_size: Optional[float] = None,
             device: torch.device = torch.device("cpu"), dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Clean top-1/top-5 and robust top-1 under untargeted L∞ PGD (ε, steps; random start),
    summed over ranks. The model is in eval mode throughout; its training mode is restored.
    Samples labelled `IGNORE_INDEX` (the padding of `data.vision.eval_loader`) are not counted."""
    was_training = module.training
    module.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, robust top1, n
    gen = torch.Generator(device=device).manual_seed(0)
    alpha = step_size if step_size is not None else 2.5 * epsilon / max(steps, 1)
    with attack_bn_mode(module, "eval"):
        for x, y in loader:
            x, y = x.to(device, dtype or x.dtype), y.to(device)
            with torch.no_grad():
                logits = module(x).float()
            counts[0] += _topk(logits, y, 1)
            counts[1] += _topk(logits, y, 5)
            if steps > 0 and epsilon > 0:
                # summed: a batch of padding only has a zero loss (a mean would be NaN); L∞ steps use the sign
                delta = pgd(lambda d, x=x, y=y: F.cross_entropy(module(x + d).float(), y, reduction="sum"), x,
                            norm="linf",
                            epsilon=epsilon,
                            step_size=alpha, steps=steps, start_random=True, generator=gen, clip_range=(0.0, 1.0))
                with torch.no_grad():
                    counts[2] += _topk(module(x + delta).float(), y, 1)
            counts[3] += (y != IGNORE_INDEX).sum()
    module.train(was_training)
    top1, top5, robust, n = all_reduce_sum(counts).tolist()
    n = max(n, 1.0)
    return {"top1": top1 / n, "top5": top5 / n,
            "robust_top1": robust / n if steps > 0 and epsilon > 0 else float("nan"), "n": n}


def evaluate_embedding(module: nn.Module, batches, attack: ConAdvConfig, epsilons: Sequence[float],
                       device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Clean accuracy and accuracy under embedding-space PGD at each ε of `epsilons` (the rest of
    the attack — norm, steps, step as a fraction of ε, `epsilon_scale`, targeted or not, random
    start — from `attack`) over dict batches with 'labels', summed over ranks. The model is in
    eval mode (no dropout in the attack); its training mode is restored. Keys: 'accuracy', 'loss',
    'robust_accuracy@<ε>', 'robust_loss@<ε>' (the model's mean loss per counted label), 'n'."""
    was_training = module.training
    module.eval()
    space = resolve_space(attack.model_copy(update={"space": "embedding"}), module)
    ratio = attack.step_size / attack.epsilon
    adversaries = [Adversary(module, space, attack.model_copy(update={"epsilon": e, "step_size": ratio * e}),
                             default_loss, rank=0) for e in epsilons]
    k = len(epsilons)
    sums = torch.zeros(2 + 2 * k + 1, dtype=torch.float64, device=device)  # correct, loss: clean, per ε; n
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        outs = []
        with torch.no_grad():
            outs.append(module(**batch))
        for adversary in adversaries:
            delta = adversary(batch, step=-1, micro=i)
            with torch.no_grad():
                outs.append(space.forward(module, batch, delta))
        n = correct_of(outs[0], batch)[1]
        for j, out in enumerate(outs):  # the model's mean loss, weighted by the batch's counted labels
            sums[j] += correct_of(out, batch)[0]
            sums[1 + k + j] += out.loss.detach().double() * n
        sums[-1] += n
    module.train(was_training)
    totals = all_reduce_sum(sums).tolist()
    n = max(totals[-1], 1.0)
    names = ["", *(f"@{e:g}" for e in epsilons)]
    return {**{("robust_accuracy" if j else "accuracy") + name: totals[j] / n for j, name in enumerate(names)},
            **{("robust_loss" if j else "loss") + name: totals[1 + k + j] / n for j, name in enumerate(names)},
            "n": n}
