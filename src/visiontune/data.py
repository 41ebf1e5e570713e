"""ImageDataModule: datasets, seeded stratified splits, loaders. It owns the transforms.

Standard datasets (Fashion-MNIST, MNIST, CIFAR) are held in memory as uint8 tensors and transformed
per sample in the main process: on 2 cores a worker process would only compete with the model.
Image folders and CSV lists are decoded with PIL in worker processes, with bad files found and
skipped (or, with `data.strict=true`, refused) at setup.

File datasets (`data.root`):
- `imagefolder`: `root/train/<class>/*`, optional `root/val/<class>/*` and `root/test/<class>/*`.
- `csv`: a CSV file of `path,label` lines (the training list), or a folder holding `train.csv` and
  optional `val.csv` / `test.csv`. Paths are relative to the CSV's folder; the first line is a header
  when its path cell has no file extension (`path,label`, `filename,class`, ...).
Classes are the sorted names found in train. Without a val split, a seeded stratified `val_fraction`
of train becomes val; without a test split, the run tests on val.
"""

from __future__ import annotations

import csv
import gzip
import logging
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from visiontune.errors import UserError
from visiontune.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
STANDARD = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}
BALANCE = ("none", "sampler", "loss_weights")
SPLITS = ("train", "val", "test")
MAX_LISTED = 50  # bad files named one by one in a report; the rest are counted
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


# ---------------------------------------------------------------- splits (pure)


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices whose class proportions match `labels` (largest remainder), seeded."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take))[: n - take.sum()]:
        take[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices; each class keeps at least one training sample."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(int(round(len(idx) * val_fraction)), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ---------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def load_image(path: str | Path) -> Image.Image:
    """Any mode (L, RGBA, P, I;16, CMYK) to RGB, with EXIF orientation applied."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            arr = 255.0 * arr / max(float(arr.max()), 1.0)
            img = Image.fromarray(arr.astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img, mask=img.getchannel("A"))
            return background
        return img.convert("RGB")


class FileImageDataset(Dataset):
    """Image files with labels. A file that fails to decode mid-run is skipped with a warning."""

    def __init__(self, paths: list[str], labels: list[int], transform=None):
        self.paths, self.labels, self.transform = paths, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i])
        except Exception as exc:
            warnings.warn(f"skipping unreadable image {self.paths[i]}: {exc}", stacklevel=1)
            return None
        return (self.transform(image) if self.transform else image), int(self.labels[i])


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation drawn from (seed, epoch): a resumed run sees exactly the uninterrupted order.

    With `weights`, `n` indices drawn with replacement in proportion to them (class-balanced sampling),
    still a function of (seed, epoch). Lightning calls `set_epoch` at every epoch start (and wraps this
    for DDP).
    """

    def __init__(self, n: int, seed: int, weights=None):
        self.n, self.seed, self.epoch = n, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=gen).tolist())
        return iter(torch.randperm(self.n, generator=gen).tolist())


def collate_skip_none(batch):
    return torch.utils.data.default_collate([b for b in batch if b is not None])


def check_image(path: Path) -> str | None:
    """Why `path` is not a usable image, or None. Header check plus a JPEG end-marker check."""
    if not path.is_file():
        return "missing"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "not an image file"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:
        return f"unreadable ({type(exc).__name__})"
    if path.suffix.lower() in (".jpg", ".jpeg"):
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            if f.read(2) != b"\xff\xd9":
                return "truncated JPEG"
    return None


def drop_bad_files(
    paths: list[str], labels: list[int], where: Path, strict: bool
) -> tuple[list[str], list[int]]:
    """The usable (paths, labels). Bad files are listed by path, then skipped (warning) or fatal (strict)."""
    good_paths, good_labels, bad = [], [], []
    for path, label in zip(paths, labels, strict=True):
        problem = check_image(Path(path))
        if problem:
            bad.append(f"{path} ({problem})")
        else:
            good_paths.append(path)
            good_labels.append(label)
    if bad:
        listing = "\n  ".join(bad[:MAX_LISTED])
        if len(bad) > MAX_LISTED:
            listing += f"\n  ... and {len(bad) - MAX_LISTED} more"
        if strict:
            raise UserError(f"{len(bad)} bad files under {where} (data.strict=true):\n  {listing}")
        warnings.warn(f"skipping {len(bad)} bad files under {where}:\n  {listing}", stacklevel=3)
    return good_paths, good_labels


def _unknown_classes(where: Path, names, classes: list[str], train: str) -> None:
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise UserError(
            f"{where} has classes that are not in {train}: {unknown}. Fix the names, or add them to {train}"
        )


def _empty_classes(where: Path, labels: list[int], classes: list[str], what: str) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        raise UserError(f"{what} with no usable images under {where}: {empty}. Add images or remove them")


def scan_folder(
    root: Path, strict: bool, classes: list[str] | None = None
) -> tuple[list[str], list[str], list[int]]:
    """(classes, paths, labels) of `root/<class>/*`; bad files are reported, then skipped or fatal."""
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist. Fix: data.root=/path/with/<class>/ folders")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"{root} has no class folders. Expected {root}/<class_name>/<image files>")
    if classes is None:
        classes = found
    else:
        _unknown_classes(root, found, classes, "train/")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if folder.is_dir():
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
            paths += [str(p) for p in files]
            labels += [label] * len(files)
    paths, labels = drop_bad_files(paths, labels, root, strict)
    if found == classes:
        _empty_classes(root, labels, classes, "class folders")
    return classes, paths, labels


def read_csv_list(csv_path: Path) -> tuple[list[str], list[str]]:
    """(paths, label names) of a `path,label` CSV. Paths are relative to the CSV's folder.

    The first line is a header when its path cell has no file extension (`path,label`).
    """
    if not csv_path.is_file():
        raise UserError(f"{csv_path} does not exist. Fix: data.root=/path/to/train.csv")
    rows = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if len(cells) != 2 or not cells[0] or not cells[1]:
                raise UserError(f"{csv_path} line {line}: expected `path,label`, got {row!r}")
            rows.append(cells)
    if rows and not Path(rows[0][0]).suffix and not (csv_path.parent / rows[0][0]).is_file():
        rows = rows[1:]  # the header
    if not rows:
        raise UserError(f"{csv_path} lists no images. Expected lines of `path,label`")
    return [str(csv_path.parent / p) for p, _ in rows], [label for _, label in rows]


def scan_csv(
    csv_path: Path, strict: bool, classes: list[str] | None = None
) -> tuple[list[str], list[str], list[int]]:
    """(classes, paths, labels) of a `path,label` CSV; bad files are reported, then skipped or fatal."""
    paths, names = read_csv_list(csv_path)
    if classes is None:
        classes = sorted(set(names))
    else:
        _unknown_classes(csv_path, names, classes, "the training CSV")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = drop_bad_files(paths, [index[n] for n in names], csv_path, strict)
    if set(names) == set(classes):
        _empty_classes(csv_path, labels, classes, "classes")
    return classes, paths, labels


def csv_files(root: Path) -> dict[str, Path]:
    """The CSV of each split: `root` itself is the training list, or a folder with train/val/test.csv."""
    if root.is_file():
        return {"train": root}
    if not (root / "train.csv").is_file():
        raise UserError(
            f"{root} has no train.csv. Fix: data.root=/path/to/list.csv, or a folder with train.csv "
            "(and optional val.csv, test.csv)"
        )
    return {split: root / f"{split}.csv" for split in SPLITS if (root / f"{split}.csv").is_file()}


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


# ---------------------------------------------------------------- the DataModule


class ImageDataModule(L.LightningDataModule):
    """Datasets and loaders for one run. `data_config` is the backbone's pretrained preprocessing."""

    def __init__(self, data: dict, augment: dict, data_config: dict, seed: int = 0):
        super().__init__()
        self.cfg = dict(data)
        self.augment = dict(augment)
        self.seed = seed
        self.name = self.cfg["name"]
        self.root = Path(os.path.expanduser(str(self.cfg["root"])))
        size = self.cfg.get("image_size") or data_config["input_size"][-1]
        self.image_size = int(size)
        self.mean = self.cfg.get("mean") or data_config["mean"]
        self.std = self.cfg.get("std") or data_config["std"]
        self.interpolation = self.cfg.get("interpolation") or data_config["interpolation"]
        crop = self.cfg.get("crop_pct")
        self.crop_pct = float(crop if crop is not None else data_config["crop_pct"])
        self._classes: list[str] | None = None
        self.train_set = self.val_set = self.test_set = None
        self.balance = self.cfg.get("balance") or "none"
        if self.balance not in BALANCE:
            raise UserError(f"data.balance={self.balance} is unknown; choose one of {', '.join(BALANCE)}")
        if self.name == "imagefolder" and not self.root.is_dir():
            raise UserError(
                f"data.root {self.root} does not exist. Fix: data.root=/path/to/dataset (with train/<class>/)"
            )
        if self.name == "csv" and not self.root.exists():
            raise UserError(
                f"data.root {self.root} does not exist. Fix: data.root=/path/to/train.csv, or a folder "
                "with train.csv (and optional val.csv, test.csv)"
            )

    # -- transforms
    def eval_transform(self):
        return eval_transform(self.image_size, self.mean, self.std, self.interpolation, self.crop_pct)

    def train_transform(self):
        return train_transform(
            self.augment, self.image_size, self.mean, self.std, self.interpolation, self.crop_pct
        )

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            if self.name in STANDARD:
                names = (
                    FASHION_CLASSES
                    if self.name == "fashion_mnist"
                    else [str(i) for i in range(STANDARD[self.name])]
                )
                self._classes = list(names)
            elif self.name == "imagefolder":
                train_dir = self.root / "train"
                if not train_dir.is_dir():
                    raise UserError(
                        f"{self.root} has no train/ folder. Expected {self.root}/train/<class>/<images>"
                    )
                self._classes = sorted(
                    d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                )
                if not self._classes:
                    raise UserError(
                        f"{train_dir} has no class folders. Expected {train_dir}/<class>/<images>"
                    )
            elif self.name == "csv":
                self._classes = sorted(set(read_csv_list(csv_files(self.root)["train"])[1]))
            else:
                raise UserError(
                    f"unknown dataset '{self.name}'; choose fashion_mnist, mnist, cifar10, cifar100, "
                    "imagefolder, csv"
                )
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self) -> None:
        if self.name in STANDARD:
            load_standard(self.name, self.root, train=False)  # downloads once, on rank 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or (stage == "test" and self.test_set is not None):
            return
        if self.name in STANDARD:
            self._setup_standard(stage)
        else:
            self._setup_folders(stage)
        sizes = {
            k: len(v)
            for k, v in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set))
            if v
        }
        log.info("data %s: %s images, %d classes", self.name, sizes, self.num_classes)

    def _subset(self, n, labels, seed_offset):
        return stratified_subset(labels, n, self.seed + seed_offset) if n else np.arange(len(labels))

    def _setup_standard(self, stage):
        x_test, y_test = load_standard(self.name, self.root, train=False)
        keep = self._subset(self.cfg.get("test_subset"), y_test.numpy(), 2)
        self.test_set = TensorImageDataset(x_test[keep], y_test[keep], self.eval_transform())
        if stage == "test":
            return
        x, y = load_standard(self.name, self.root, train=True)
        train_idx, val_idx = stratified_split(y.numpy(), self.cfg.get("val_fraction", 0.1), self.seed)
        val_idx = val_idx[self._subset(self.cfg.get("val_subset"), y[val_idx].numpy(), 1)]
        train_idx = train_idx[self._subset(self.cfg.get("train_subset"), y[train_idx].numpy(), 0)]
        self.train_set = TensorImageDataset(x[train_idx], y[train_idx], self.train_transform())
        self.val_set = TensorImageDataset(x[val_idx], y[val_idx], self.eval_transform())

    def _setup_folders(self, stage):
        """imagefolder and csv: scan every split (bad files out), then split, subset, fall back."""
        strict = bool(self.cfg.get("strict", False))
        classes = self.classes
        if self.name == "csv":
            splits = {s: scan_csv(path, strict, classes)[1:] for s, path in csv_files(self.root).items()}
        else:
            splits = {
                s: scan_folder(self.root / s, strict, classes)[1:] for s in SPLITS if (self.root / s).is_dir()
            }

        def take(split, indices):
            paths, labels = splits[split]
            splits[split] = ([paths[i] for i in indices], [labels[i] for i in indices])

        if "val" not in splits:
            labels = np.asarray(splits["train"][1])
            tr, va = stratified_split(labels, self.cfg.get("val_fraction", 0.1), self.seed)
            splits["val"] = splits["train"]
            take("val", va)
            take("train", tr)
        for offset, split in enumerate(("train", "val")):
            take(split, self._subset(self.cfg.get(f"{split}_subset"), np.asarray(splits[split][1]), offset))
        if "test" not in splits:
            log.warning("%s has no test split: testing on the validation split", self.root)
            splits["test"] = splits["val"]
        if self.cfg.get("test_subset"):
            take("test", self._subset(self.cfg["test_subset"], np.asarray(splits["test"][1]), 2))
        self.train_set = FileImageDataset(*splits["train"], self.train_transform())
        self.val_set = FileImageDataset(*splits["val"], self.eval_transform())
        self.test_set = FileImageDataset(*splits["test"], self.eval_transform())

    # -- loaders
    def _num_workers(self) -> int:
        n = self.cfg.get("num_workers")
        if n is not None:
            return int(n)
        if self.name in STANDARD:
            return 0  # in-memory tensors: per-sample transforms are cheaper than a worker process
        return max(1, min(8, (os.cpu_count() or 2) - 1))

    def _loader(self, dataset, shuffle: bool, sampler=None) -> DataLoader:
        workers = self._num_workers()
        return DataLoader(
            dataset,
            batch_size=int(self.cfg["batch_size"]),
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_skip_none if isinstance(dataset, FileImageDataset) else None,
            drop_last=False,
        )

    def train_labels(self) -> np.ndarray:
        labels = self.train_set.labels
        return labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train_labels(), minlength=self.num_classes)

    def class_weights(self) -> torch.Tensor | None:
        """Inverse-frequency class weights with mean 1 (for the loss) when data.balance=loss_weights.

        A class absent from the training set counts as one image. None for any other `balance`.
        """
        if self.balance != "loss_weights":
            return None
        if self.train_set is None:
            self.setup("fit")
        weights = 1.0 / np.maximum(self.class_counts(), 1).astype(np.float64)
        return torch.tensor(weights / weights.mean(), dtype=torch.float32)

    def train_dataloader(self) -> DataLoader:
        weights = None
        if self.balance == "sampler":  # each class drawn equally often, with replacement
            weights = 1.0 / np.maximum(self.class_counts()[self.train_labels()], 1)
        sampler = EpochShuffleSampler(len(self.train_set), self.seed, weights)
        return self._loader(self.train_set, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
