"""Image data sets for the vision recipe: ImageNet-layout folders and two small real embedded ones.

Every set yields `[0, 1]` tensors (normalisation lives inside the model, so perturbations are
in pixel units) and integer labels.

- `imagenet`: `<data_dir>/train/<class>/*.JPEG` and `<data_dir>/val/<class>/*.JPEG`, with the
  standard random-resized-crop + flip / resize + center-crop transforms.
- `digits`: scikit-learn's bundled 8×8 handwritten digits (1,797 images), installed with the
  package: the default when no data is given.
- `fashion-mnist`: Debian's `dataset-fashion-mnist` (70,000 28×28 images; `scripts/setup_debian.sh`).
"""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from ..batch import IGNORE_INDEX
from ..errors import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_TRAIN_SIZE = 1_281_167
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageData:
    """Train and held-out sets plus what a model needs to know about them."""

    name: str
    train: Dataset
    val: Dataset
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def digits(val_fraction: float = 0.2, seed: int = 0) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return ImageData("digits", TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), 10, 1, 8,
                     (0.3,), (0.4,))


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: Path = FASHION_MNIST_DIR) -> ImageData:
    files = {k: root / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"fashion-mnist: {missing[0]} not found; install it with "
                          "'sudo bash scripts/setup_debian.sh' (Debian package dataset-fashion-mnist)")

    def tensors(split: str) -> TensorDataset:
        x = torch.from_numpy(_idx(files[f"{split}-images"]).copy()).float().unsqueeze(1) / 255.0
        return TensorDataset(x, torch.from_numpy(_idx(files[f"{split}-labels"]).astype(np.int64)))

    return ImageData("fashion-mnist", tensors("train"), tensors("t10k"), 10, 1, 28, (0.286,), (0.353,))


def imagenet(data_dir: Path, image_size: int = 224, autoaugment: bool = False, strict: bool = False) -> ImageData:
    """ImageNet folder layout with the standard transforms (no normalisation). Unreadable files
    are skipped (see `SkipUnreadable`), or with `strict` stop the run with their name."""
    from torchvision import datasets
    from torchvision import transforms as T

    data_dir = Path(data_dir)
    for split in ("train", "val"):
        if not (data_dir / split).is_dir():
            raise ConfigError(f"--data_dir={str(data_dir)!r}: no '{split}/' folder; expected the ImageNet layout "
                              "train/<class>/*.JPEG and val/<class>/*.JPEG")
    train_tf = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    train = datasets.ImageFolder(str(data_dir / "train"), T.Compose([*train_tf, T.ToTensor()]))
    if autoaugment:
        train = AugmentedPair(train, T.Compose([*train_tf, T.AutoAugment(T.AutoAugmentPolicy.IMAGENET),
                                                T.ToTensor()]))
    val = datasets.ImageFolder(str(data_dir / "val"),
                               T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size),
                                          T.ToTensor()]))
    return ImageData("imagenet", SkipUnreadable(train, strict), SkipUnreadable(val, strict), len(val.classes), 3,
                     image_size, IMAGENET_MEAN, IMAGENET_STD)


class SkipUnreadable(Dataset):
    """An image folder whose unreadable files (truncated, corrupt, not an image) are counted and
    replaced by the next readable item, so every micro-batch keeps its size and an epoch never
    crashes half-way; with `strict`, the first one is a one-line error naming the file."""

    def __init__(self, folder, strict: bool = False):
        self.folder, self.strict = folder, strict
        self.skipped: set[str] = set()
        """Paths found unreadable by this process (a DataLoader worker counts its own)."""

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        for k in range(len(self.folder)):
            j = (i + k) % len(self.folder)
            try:
                return self.folder[j]
            except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
                path = self.folder.samples[j][0]
                reason = " ".join(str(e).split()) or type(e).__name__
                if self.strict:
                    raise ConfigError(f"{path}: unreadable image ({reason}); remove or replace it, or "
                                      "run without strict_data to skip such files") from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({reason}); "
                                  f"{len(self.skipped)} skipped so far", stacklevel=2)
        raise ConfigError(f"{self.folder.root}: none of its {len(self.folder)} images can be read")


class AugmentedPair(Dataset):
    """(clean view, AutoAugment view, label) per image, for the ConAdv + AutoAugment batches."""

    def __init__(self, base, augmented_transform):
        self.base, self.augmented_transform = base, augmented_transform

    def __len__(self) -> int:
        return len(self.base)

    @property
    def samples(self) -> list[tuple[str, int]]:
        return self.base.samples

    @property
    def root(self) -> str:
        return self.base.root

    def __getitem__(self, i: int):
        x, y = self.base[i]
        path, _ = self.base.samples[i]
        return x, self.augmented_transform(self.base.loader(path)), y


class _AutoAugmentPairs(Dataset):
    """(image, its AutoAugment view, label) of a [0, 1] tensor set (uint8 round trip); at module
    level, so that loader workers started by spawn or forkserver can unpickle it."""

    def __init__(self, base: Dataset):
        from torchvision import transforms as T

        self.base = base
        self.aa = T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        img = (x * 255).round().to(torch.uint8)
        return x, self.aa(img).float() / 255.0, y


def with_autoaugment(data: ImageData) -> ImageData:
    """An embedded tensor set whose training items gain an AutoAugment view (uint8 round trip)."""
    return ImageData(data.name, _AutoAugmentPairs(data.train), data.val, data.num_classes, data.channels,
                     data.image_size, data.mean, data.std)


@dataclass(frozen=True)
class channels_last:
    """`collate` (default: the DataLoader's) with the images in channels-last memory format,
    converted in the loader's workers: the copy to the device keeps the format."""

    collate: Optional[Callable] = None

    def __call__(self, items):
        from torch.utils.data import default_collate

        x, y = (self.collate or default_collate)(items)
        return x.contiguous(memory_format=torch.channels_last), y


def concat_views(items):
    """Collate (clean, augmented, label) items into `(cat[clean, augmented], cat[label, label])`:
    the clean half comes first so the attack can take it alone."""
    clean = torch.stack([it[0] for it in items])
    aug = torch.stack([it[1] for it in items])
    y = torch.tensor([int(it[2]) for it in items])
    return torch.cat([clean, aug]), torch.cat([y, y])


def load(name: str, data_dir: Optional[str], autoaugment: bool = False, image_size: int = 224,
         strict: bool = False) -> ImageData:
    if name == "imagenet":
        if data_dir is None:
            raise ConfigError("dataset 'imagenet' needs --data_dir /path/to/imagenet (train/ and val/ class folders)")
        return imagenet(Path(data_dir), image_size, autoaugment, strict)
    data = {"digits": digits, "fashion-mnist": fashion_mnist}[name]()
    return with_autoaugment(data) if autoaugment else data


MAX_DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class LoaderOptions:
    """How a rank's DataLoaders feed the device: worker processes (kept across epochs) and
    page-locked batches on an accelerator, so that the copy to the device can overlap compute."""

    num_workers: int = 0
    pin_memory: bool = False

    @classmethod
    def for_rank(cls, dataset: Dataset, device: Union[str, torch.device],
                 num_workers: Optional[int] = None) -> "LoaderOptions":
        """`num_workers` None: none for tensors already in memory (nothing to decode or augment),
        else this process's CPUs shared among the node's ranks, at most `MAX_DEFAULT_WORKERS`."""
        if num_workers is None:
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            num_workers = 0 if isinstance(dataset, TensorDataset) else \
                max(1, min(MAX_DEFAULT_WORKERS, cpus // max(local_ranks, 1) - 1))
        return cls(num_workers, torch.device(device).type != "cpu")

    def kwargs(self) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.num_workers > 0}


def train_stream(dataset: Dataset, micro_batch: int, rank: int, world_size: int, seed: int,
                 options: LoaderOptions = LoaderOptions(), collate_fn=None, start_epoch: int = 0) -> Iterator:
    """Micro-batches of this rank's shard, epoch after epoch, as ONE iterator: a lookahead that
    reaches into the next epoch stays exact. Incomplete last batches are dropped."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler, drop_last=True, collate_fn=collate_fn,
                        **options.kwargs())
    epoch = start_epoch
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class PaddedShard(Dataset):
    """Rank r's items r, r+N, ... padded to ⌈len/N⌉ with copies of one item labelled
    `IGNORE_INDEX`: every rank runs the same number of forwards (under ZeRO-3 each forward
    gathers parameters with the other ranks: one more batch on one rank would wait forever),
    and the padding is not counted."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        self.dataset = dataset
        self.indices = range(rank, len(dataset), world_size)
        self.length = -(-len(dataset) // world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if i < len(self.indices):
            return self.dataset[self.indices[i]]
        x, y = self.dataset[self.indices[0] if len(self.indices) else 0]
        return x, torch.as_tensor(IGNORE_INDEX) if isinstance(y, torch.Tensor) else IGNORE_INDEX


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int,
                options: LoaderOptions = LoaderOptions()) -> DataLoader:
    """Every held-out sample counted exactly once across ranks, in the same number of batches on
    every rank (`PaddedShard`)."""
    return DataLoader(PaddedShard(dataset, rank, world_size), batch_size=batch_size, **options.kwargs())
