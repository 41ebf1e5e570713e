"""The standard datasets (Fashion-MNIST, MNIST, CIFAR-10/100), held in memory as uint8 tensors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from visiontune.errors import UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
STANDARD = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}
FASHION_CLASSES = [
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
]


def standard_classes(name: str) -> list[str]:
    return list(FASHION_CLASSES) if name == "fashion_mnist" else [str(i) for i in range(STANDARD[name])]


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


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_standard(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, C, H, W), int64 labels) of a standard dataset."""
    split = "train" if train else "t10k"
    if name == "fashion_mnist":
        for folder in (root, root / "fashion-mnist", DEBIAN_FASHION_MNIST):
            images = folder / f"{split}-images-idx3-ubyte.gz"
            if images.is_file():
                x = _read_idx(images)
                y = _read_idx(folder / f"{split}-labels-idx1-ubyte.gz")
                return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
    from torchvision import datasets

    cls = {"fashion_mnist": datasets.FashionMNIST, "mnist": datasets.MNIST, "cifar10": datasets.CIFAR10,
           "cifar100": datasets.CIFAR100}[name]  # fmt: skip
    try:
        ds = cls(str(root), train=train, download=True)
    except Exception as exc:
        raise UserError(
            f"{name} is not in {root} and could not be downloaded ({type(exc).__name__}). Fix: put the files "
            f"there (data.root=...)"
            + (" or `apt-get install dataset-fashion-mnist`" if name == "fashion_mnist" else "")
        ) from None
    x = torch.as_tensor(np.asarray(ds.data))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
