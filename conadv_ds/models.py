"""Image classifiers for ConAdv: models that take [0, 1] pixels and normalise inside."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class Normalize(nn.Module):
    """(x − mean) / std inside the model, so that inputs and perturbations stay in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """A ResNet for small images (8×8 to 32×32): a 3×3 stem and three stages of basic blocks."""

    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 32, blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def build_classifier(name: str, num_classes: int, in_chans: int, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> nn.Module:
    """`Normalize` + a classifier: `small_resnet`, any torchvision model name, or any timm model name."""
    if name == "small_resnet":
        body = SmallResNet(num_classes, in_chans)
    else:
        body = _named_model(name, num_classes, in_chans)
    return nn.Sequential(Normalize(mean, std), body)


def _named_model(name: str, num_classes: int, in_chans: int) -> nn.Module:
    import torchvision

    if name in torchvision.models.list_models():
        if in_chans != 3:
            raise ConfigError(f"--model={name}: torchvision models take 3 channels, the data has {in_chans}; "
                              "use --model small_resnet or a timm model")
        # the official code's TF ResNet starts the last BatchNorm of every residual block at γ = 0
        residual = {"zero_init_residual": True} if name.startswith(("resnet", "resnext", "wide_resnet")) else {}
        return torchvision.models.get_model(name, num_classes=num_classes, **residual)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and name in timm.list_models():
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans)
    raise ConfigError(f"--model={name!r}: not a torchvision or timm model name (or small_resnet)")
