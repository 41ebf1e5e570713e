"""The standard datasets (Fashion-MNIST, MNIST, CIFAR-10/100), held in memory as uint8 tensors.

`STANDARD` is the registry: a dataset name (the `data.name` of its config) and everything the
datamodule needs to know of it, its class names and a loader. The datamodule has no branch for any
one of them: they are all split, subset, transformed and loaded alike.

Adding an in-memory dataset is two files: an entry here (`StandardDataset(classes, load)`), and its
config `conf/data/<name>.yaml` (`defaults: [_standard, _self_]` and `name: <name>`, plus anything it
sets differently, such as `image_size`). The loader returns every image of a split at once, as
uint8 (N, C, H, W) with C = 1 (grey) or 3 (colour), and int64 labels indexing `classes`.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from visiontune.errors import UserError

# (root, train) -> (uint8 images (N, C, H, W), int64 labels); it may download into root
Loader = Callable[[Path, bool], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StandardDataset:
    """An in-memory dataset: its class names (label i is `classes[i]`) and its loader."""

    classes: tuple[str, ...]
    load: Loader


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.target(i)

    def target(self, i: int) -> int:
        """Sample i's target without its image (cached datasets read it so)."""
        return int(self.labels[i])


def load_torchvision(name: str, dataset: str, hint: str, root: Path, train: bool):
    """torchvision's `datasets.<dataset>`, downloaded into root when it is not there."""
    from torchvision import datasets

    try:
        ds = getattr(datasets, dataset)(str(root), train=train, download=True)
    except Exception as exc:
        raise UserError(
            f"{name} is not in {root} and could not be downloaded ({type(exc).__name__}). Fix: put the "
            f"files there (data.root=...){hint}"
        ) from None
    x = torch.as_tensor(np.asarray(ds.data))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # grey (N, H, W), colour (N, H, W, C)
    return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


def torchvision_loader(name: str, dataset: str, hint: str = "") -> Loader:
    """The loader of torchvision's `datasets.<dataset>`; `hint` ends the message when it is missing.
    (A partial of a module function, not a closure: a datamodule holding it can be pickled.)"""
    return partial(load_torchvision, name, dataset, hint)


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_fashion_download = torchvision_loader(
    "fashion_mnist", "FashionMNIST", " or `apt-get install dataset-fashion-mnist`"
)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file's array (read-only). A process unpacks each file once while it stays unchanged: sweeps
    and tests build many runs in one process, and each would gunzip the 26 MB of training images again."""
    stat = path.stat()
    return _unpack_idx(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _unpack_idx(path: str, mtime_ns: int, size: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The IDX files in root, root/fashion-mnist or Debian's dataset-fashion-mnist; else torchvision's."""
    split = "train" if train else "t10k"
    for folder in (root, root / "fashion-mnist", DEBIAN_FASHION_MNIST):
        images = folder / f"{split}-images-idx3-ubyte.gz"
        if images.is_file():
            x = _read_idx(images)
            y = _read_idx(folder / f"{split}-labels-idx1-ubyte.gz")
            return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
    return _fashion_download(root, train)


def numbered(n: int) -> tuple[str, ...]:
    """Class names "0", "1", ... for datasets whose classes are known by their index."""
    return tuple(str(i) for i in range(n))


STANDARD: dict[str, StandardDataset] = {
    "fashion_mnist": StandardDataset(FASHION_CLASSES, load_fashion_mnist),
    "mnist": StandardDataset(numbered(10), torchvision_loader("mnist", "MNIST")),
    "cifar10": StandardDataset(numbered(10), torchvision_loader("cifar10", "CIFAR10")),
    "cifar100": StandardDataset(numbered(100), torchvision_loader("cifar100", "CIFAR100")),
}


def load_standard(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, C, H, W), int64 labels) of the train or test split of a registered dataset."""
    return STANDARD[name].load(root, train)
