"""ImageDataModule: datasets, seeded stratified splits, loaders. It owns the transforms.

In-memory datasets (the registry `visiontune.data.standard.STANDARD`: Fashion-MNIST, MNIST, CIFAR)
are held as uint8 tensors and transformed per sample in the main process: on 2 cores a worker
process would only compete with the model. Each is handled alike, from its registry entry.
Image folders and CSV lists are decoded with PIL in worker processes, with bad files found and
skipped (or, with `data.strict=true`, refused) at setup.

File datasets (`data.root`):
- `imagefolder`: `root/train/<class>/*`, optional `root/val/<class>/*` (or `validation/`) and
  `root/test/<class>/*`; or a flat `root/<class>/*`, which is split into train, val and test (seeded,
  stratified, `val_fraction` and `test_fraction` of it). A split folder, or the flat root, may instead
  hold a Hugging Face `metadata.csv` / `metadata.jsonl` (columns `file_name`, `label`).
- `csv`: a CSV file of `path,label` lines (the training list), or a folder holding `train.csv` and
  optional `val.csv` / `test.csv`. Paths are relative to the CSV's folder; the first line is a header
  when its path cell has no file extension (`path,label`, `filename,class`, ...).
Classes are the sorted names found in train. With `task=multilabel|multitask` (the `task` argument)
the CSV carries several labels per image (see `files.read_task_csv`), each target is a dict
{head: target}, and `heads` names each head's classes. Without a val split, a seeded stratified `val_fraction`
of train becomes val; without a test split, the run tests on val.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visiontune.data.cache import RANDOM_CROP_PRESETS, cache_decoded
from visiontune.data.checks import check_data, check_task_data
from visiontune.data.device import DEVICE_PRESETS, BatchTransform, batch_generator
from visiontune.data.files import (
    SPLITS,
    FileImageDataset,
    TaskImageDataset,
    collate_skip_none,
    csv_files,
    imagefolder_sources,
    read_csv_list,
    scan_csv,
    scan_source,
    scan_task_csv,
    source_classes,
    task_classes,
)
from visiontune.data.images import DEFAULT_MAX_PIXELS
from visiontune.data.shards import ShardImageDataset, ShardSet, open_shards
from visiontune.data.splits import (
    held_out,
    missing_classes,
    shares,
    smallest_class,
    smallest_held_out,
    stratified_fold,
    stratified_partition,
    stratified_split,
    stratified_subset,
)
from visiontune.data.standard import STANDARD, TensorImageDataset
from visiontune.data.transforms import eval_transform, train_transform
from visiontune.data.workers import ignore_interrupts
from visiontune.data.wrapped import WrappedDataset
from visiontune.errors import UserError
from visiontune.models.heads import config_heads, is_multi

log = logging.getLogger(__name__)
FILE_DATASETS = ("imagefolder", "csv")
SHARDS = "shards"  # data=shards: a shard set written by visiontune-shard (visiontune.data.shards)
SHARD_GEOMETRY = ("image_size", "crop_pct", "interpolation")


class EpochShuffleSampler(torch.utils.data.DistributedSampler):
    """This rank's part of an epoch order drawn from (seed, epoch): a resumed run sees exactly the
    uninterrupted order, on every rank.

    The order is a permutation of the n indices; with `groups` (the sizes of consecutive runs of indices,
    a shard set's chunks) a permutation of the groups, each shuffled within, so that a reader moves from
    chunk to chunk. With `weights`, n indices drawn with replacement in proportion to them (class-balanced
    sampling). Rank r of `num_replicas` takes the r-th of as many consecutive blocks: the ranks' parts are
    disjoint and together the whole epoch. Each rank gets the same number of batches of `batch_size` (DDP
    steps together): in the rare epoch where equal blocks cannot give that, a short rank repeats its first
    image(s), at most num_replicas - 1 in all. Lightning calls `set_epoch` at every epoch start and leaves
    this sampler alone under DDP (it is a DistributedSampler). With groups and `workers` loader processes,
    each worker is dealt chunks of its own (`_by_worker`). `skip` drops the first indices of this rank's
    next pass only: a run resumed mid-epoch continues where the interrupted one stopped.
    With `seeded`, each index comes as (index, its augmentation seed) (see `sample_seed`, `SeededSamples`).
    """

    def __init__(self, n: int, seed: int, weights=None, groups=None, num_replicas: int = 1, rank: int = 0,
                 batch_size: int = 1, seeded: bool = False, workers: int = 0):  # fmt: skip
        self.n, self.seed, self.epoch, self.skip, self.workers = n, seed, 0, 0, workers
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.groups = None if groups is None or len(groups) <= 1 else [int(g) for g in groups]
        self.num_replicas, self.rank, self.batch_size, self.seeded = num_replicas, rank, batch_size, seeded
        self.shuffle, self.drop_last = True, False  # what Lightning reads of a DistributedSampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _bounds(self) -> list[int]:
        """Where each rank's block of the epoch order starts (and the last ends)."""
        share, extra = divmod(self.n, self.num_replicas)
        return [r * share + min(r, extra) for r in range(self.num_replicas + 1)]

    def __len__(self) -> int:
        bounds = self._bounds()
        sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        batches = max(-(-s // self.batch_size) for s in sizes)
        mine = sizes[self.rank]
        return max(mine, (batches - 1) * self.batch_size + 1)  # a short rank fills its last batch with one

    def _by_worker(self, mine: list[int]) -> list[int]:
        """This rank's part with its chunks dealt to `workers` streams (chunk j to stream j % workers) and
        the streams' batches interleaved: the DataLoader hands batch i to worker i % workers, so each worker
        reads chunks of its own (a remote chunk is fetched once, not once per worker)."""
        starts = np.cumsum([0, *self.groups])
        chunk = np.searchsorted(starts, mine, side="right") - 1
        streams: list[list[int]] = [[] for _ in range(self.workers)]
        run = -1
        for k, index in enumerate(mine):
            if k == 0 or chunk[k] != chunk[k - 1]:
                run += 1
            streams[run % self.workers].append(index)
        out: list[int] = []
        for start in range(0, max(len(s) for s in streams), self.batch_size):
            for stream in streams:
                out += stream[start : start + self.batch_size]
        return out

    def order(self) -> list[int]:
        """The whole epoch's order, before the ranks' split."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=gen).tolist()
        if self.groups is None:
            return torch.randperm(self.n, generator=gen).tolist()
        starts = np.cumsum([0, *self.groups])
        order: list[int] = []
        for g in torch.randperm(len(self.groups), generator=gen).tolist():
            order += (int(starts[g]) + torch.randperm(self.groups[g], generator=gen)).tolist()
        return order

    def __iter__(self):
        bounds = self._bounds()
        mine = self.order()[bounds[self.rank] : bounds[self.rank + 1]]
        mine += mine[: len(self) - len(mine)]
        if self.groups is not None and self.workers > 1:
            mine = self._by_worker(mine)
        skip, self.skip = self.skip, 0
        mine = mine[skip:]
        if self.seeded:
            return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in mine])
        return iter(mine)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch: a function of (seed, epoch, index) alone, so that a
    resumed run (and any rank, worker or batch position) draws the same augmentation for it."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSamples(WrappedDataset):
    """The training split read by (index, seed) pairs (`EpochShuffleSampler(seeded=True)`): each image is
    transformed under the torch RNG seeded with its own seed, in a fork, so that its random augmentation
    depends on (seed, epoch, index) alone and the process's RNG is left as it was."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.base[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would also queue a (lazy) seed of every CUDA device
            torch.default_generator.manual_seed(seed)
            return self.base[index]

    def __getitems__(self, keys: list):
        """A batch: the base's own batched read where it has one (the feature cache's), under one seed
        drawn from its images' seeds; else image by image, each under its own."""
        batched = getattr(self.base, "__getitems__", None)
        if batched is None or not keys or not isinstance(keys[0], tuple):
            return [self[key] for key in keys]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sum(seed for _, seed in keys) % 2**63)
            return batched([index for index, _ in keys])


class ImageDataModule(L.LightningDataModule):
    """Datasets and loaders for one run. `data_config` is the backbone's pretrained preprocessing."""

    def __init__(self, data: dict, augment: dict, data_config: dict, seed: int = 0, task: dict | None = None):
        super().__init__()
        self.cfg = dict(data)
        check_data(self.cfg)  # again: code may build a datamodule without validating a config first
        self.task = dict(task) if is_multi(task) else None  # None: one class per image
        # a checkpoint's task names each head's classes; a config's task has them read from train.csv
        heads = (self.task or {}).get("heads") or []
        self._heads: list[dict] | None = heads if heads and all("classes" in h for h in heads) else None
        self.augment = dict(augment)
        self.seed = seed
        self.name = self.cfg["name"]
        self.standard = STANDARD.get(self.name)  # an in-memory dataset's registry entry; None: files
        self.root = Path(os.path.expanduser(str(self.cfg["root"])))
        # data=shards: the shard set, opened (and checked against this run) when first needed: at once when
        # its manifest gives the geometry; later (the classes, setup) when the config names it all, as a
        # checkpoint's does, so that a command that only needs the transforms never reaches the shards
        self._shards: ShardSet | None = None
        self._task_config = task
        if self.name == SHARDS and any(self.cfg.get(k) is None for k in SHARD_GEOMETRY):
            data_config = self._shard_geometry(data_config)
        size = self.cfg.get("image_size") or data_config["input_size"][-1]
        self.image_size = int(size)
        self.mean = self.cfg.get("mean") or data_config["mean"]
        self.std = self.cfg.get("std") or data_config["std"]
        self.interpolation = self.cfg.get("interpolation") or data_config["interpolation"]
        crop = self.cfg.get("crop_pct")
        self.crop_pct = float(crop if crop is not None else data_config["crop_pct"])
        self._classes: list[str] | None = None
        # data=imagefolder: ({split: its folder or metadata file}, flat); see files.imagefolder_sources
        self._layout: tuple[dict[str, Path], bool] | None = None
        self.train_set = self.val_set = self.test_set = None
        # where each split's images come from, for its messages: (how, where); see `_how`
        self._origins: dict[str, tuple[str, str]] = {}
        # a flat folder's split: ({held-out part: its fraction}, class counts of the whole folder)
        self._flat: tuple[dict[str, float], np.ndarray] | None = None
        # (train, eval) BatchTransform once enable_device_transforms has turned them on
        self.device_transforms: tuple | None = None
        self.balance = self.cfg.get("balance", "none")
        # what the loaders read in place of a split while it gives a dataset (see serve_instead)
        self.stand_in: Callable[[str], Dataset | None] | None = None
        if self.task and self.name != SHARDS:
            check_task_data(self.task["name"], self.name, self.balance)
        if self.name == "imagefolder" and self.root.is_file():
            raise UserError(
                f"data.root {self.root} is a file; data=imagefolder needs a folder of <class>/ folders, or "
                "with train/<class>/ (for a CSV list use data=csv)"
            )
        if self.name == "imagefolder" and not self.root.is_dir():
            raise UserError(
                f"data.root {self.root} does not exist. Fix: data.root=/path/to/dataset (with <class>/ or "
                "train/<class>/ folders)"
            )
        if self.name == "csv" and not self.root.exists():
            raise UserError(
                f"data.root {self.root} does not exist. Fix: data.root=/path/to/train.csv, or a folder "
                "with train.csv (and optional val.csv, test.csv)"
            )

    @property
    def shards(self) -> ShardSet | None:
        """data=shards: the opened shard set, checked against this run (`_check_shards`); else None."""
        if self._shards is None and self.name == SHARDS:
            self._shards = open_shards(
                str(self.cfg["root"]), self.cfg.get("cache_dir"), self.cfg.get("cache_limit")
            )
            self._check_shards()
        return self._shards

    def _shard_geometry(self, data_config: dict) -> dict:
        """The backbone's preprocessing with the shards' geometry as its default."""
        stored = self.shards.manifest
        return {**data_config, "input_size": (3, stored["image_size"], stored["image_size"]),
                "crop_pct": stored["crop_pct"], "interpolation": stored["interpolation"]}  # fmt: skip

    def stored_geometry(self) -> dict:
        """data=shards: the image size, crop and interpolation the shards were written at, which a checkpoint
        stores among its data settings (so that its transforms need no shards); {} for other data."""
        if self.name != SHARDS:
            return {}
        return {"image_size": self.image_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation}

    def _check_shards(self) -> None:
        """Refuse, in one line, a run that asks for another image size, crop, interpolation or task than the
        shards were written with, or for what shards cannot give; take the task's heads from the manifest."""
        stored = self._shards.manifest
        for key in ("image_size", "crop_pct", "interpolation"):
            asked = self.cfg.get(key)
            if asked is not None and asked != stored[key]:
                raise UserError(
                    f"data.{key}={asked}, but the shards at {self.cfg['root']} were written at {key}={stored[key]} "
                    f"(stored at {stored['stored_size']} px). Fix: leave data.{key} unset, or rewrite them with "
                    f"visiontune-shard data.{key}={asked}"
                )
        for key in ("train_subset", "val_subset", "test_subset", "folds"):
            if self.cfg.get(key):
                raise UserError(
                    f"data.{key}={self.cfg[key]} with data=shards: the shards hold the splits they were written "
                    f"with. Fix: write them with data.{key}={self.cfg[key]} (visiontune-shard), or drop it here"
                )
        if self.cfg.get("cache", "none") != "none":
            raise UserError(f"data.cache={self.cfg['cache']} with data=shards: shards are decoded already. "
                            "Fix: data.cache=none")  # fmt: skip
        if self.augment.get("name") in RANDOM_CROP_PRESETS:
            raise UserError(
                f"data=shards with augment={self.augment['name']}: its random resized crops need the full decoded "
                f"image, the shards hold it at {stored['stored_size']} px. Use a preset without random crops "
                "(flip, affine, color, randaugment, ...)"
            )
        kinds = (
            (self._shards.task or {}).get("name", "multiclass"),
            (self._task_config or {}).get("name", "multiclass"),
        )
        if kinds[0] != kinds[1]:
            raise UserError(f"{self.cfg['root']} holds shards of task={kinds[0]}; this run asks for task={kinds[1]}. "
                            f"Fix: task={kinds[0]}")  # fmt: skip
        if self.task and self._heads is None:
            self._heads = [dict(h) for h in self._shards.task["heads"]]

    # -- transforms
    def eval_transform(self):
        return eval_transform(self.image_size, self.mean, self.std, self.interpolation, self.crop_pct)

    def train_transform(self):
        return train_transform(
            self.augment, self.image_size, self.mean, self.std, self.interpolation, self.crop_pct
        )

    @property
    def heads(self) -> list[dict] | None:
        """multilabel/multitask: the task's heads with their classes (from the training CSV); else None."""
        if self.task and self._heads is None and self.shards is not None:
            pass  # opening the shards took their heads from the manifest
        if self.task and self._heads is None:
            self._heads = task_classes(
                csv_files(self.root)["train"], config_heads(self.task), self.task.get("label_sep", "|"),
                self.task["name"] == "multitask",
            )  # fmt: skip
        return self._heads

    @property
    def classes(self) -> list[str]:
        """The class names; for multilabel the labels, for multitask `<head>/<class>` of every head in order."""
        if self._classes is None:
            if self.task:
                prefix = self.task["name"] == "multitask"
                self._classes = [
                    f"{h['name']}/{c}" if prefix else c for h in self.heads for c in h["classes"]
                ]
            elif self.standard:
                self._classes = list(self.standard.classes)
            elif self.shards is not None:
                self._classes = self.shards.classes
            elif self.name == "imagefolder":
                self._classes = source_classes(self.layout[0]["train"])
            elif self.name == "csv":
                self._classes = sorted(set(read_csv_list(csv_files(self.root)["train"])[1]))
            else:
                names = ", ".join([*STANDARD, *FILE_DATASETS, SHARDS])
                raise UserError(f"unknown dataset '{self.name}'; choose {names}")
        return self._classes

    @property
    def layout(self) -> tuple[dict[str, Path], bool]:
        """data=imagefolder: ({split: its folder or metadata file}, whether the root is one flat folder)."""
        if self._layout is None:
            self._layout = imagefolder_sources(self.root)
        return self._layout

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self) -> None:
        if self.standard:
            self.standard.load(self.root, False)  # downloads once, on rank 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or (stage == "test" and self.test_set is not None):
            return
        if self.standard:
            self._setup_in_memory(stage)
        elif self.shards is not None:
            self._setup_shards(stage)
        else:
            self._setup_folders(stage)
        parts = ("test",) if stage == "test" else ("train", "val", "test")  # what the stage reads
        self._refuse_empty_splits(parts)
        self._warn_missing_classes(parts)
        if not self.standard and self.name != SHARDS:
            self._cache_decoded(stage)
        sizes = {
            k: len(v)
            for k, v in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set))
            if v
        }
        log.info("data %s: %s images, %d classes", self.name, sizes, self.num_classes)

    def _split_off_val(self, labels: np.ndarray, train: str) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices: fold `data.fold` of `data.folds`, or a `val_fraction` split of `train`
        (where the training images are, for the messages)."""
        folds = self.cfg.get("folds")
        self._origins["val"] = ("folds" if folds else "fraction", train)
        if folds:
            return stratified_fold(labels, int(folds), int(self.cfg.get("fold") or 0), self.seed)
        return stratified_split(labels, self.cfg.get("val_fraction", 0.1), self.seed)

    def _split_flat(self, labels: list[int]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(train, val, test) indices of a flat folder: seeded, stratified shares `data.val_fraction` and
        `data.test_fraction` of it (`splits.stratified_partition`), and one log line that says so. val is
        None with data.folds (a fold of train, split off next), test None with data.test_fraction=0 (the
        run tests on val). A class of one image cannot be split: a UserError that names it."""
        labels = np.asarray(labels, dtype=np.int64)
        test_fraction = float(self.cfg.get("test_fraction", 0.1))
        parts = {} if self.cfg.get("folds") else {"val": float(self.cfg.get("val_fraction", 0.1))}
        if test_fraction > 0:
            parts["test"] = test_fraction
        fractions = list(parts.values())
        if sum(fractions) >= 1:
            raise UserError(
                f"invalid config value data.test_fraction={test_fraction}: must be below 1 - "
                f"data.val_fraction={parts['val']}, so that train keeps the rest of {self._origins['train'][1]}"
            )
        self._flat = (parts, np.bincount(labels, minlength=self.num_classes))
        where = self._origins["train"][1]
        alone = [c for c, n in zip(self.classes, self._flat[1], strict=True) if n == 1]
        if alone and any(f > 0 for f in fractions):
            need = smallest_class(fractions, [i for i, f in enumerate(fractions) if f > 0])
            what = f"class {alone[0]!r} has" if len(alone) == 1 else f"classes {alone} have"
            raise UserError(
                f"flat folder {where}: {what} only 1 image, too few to split into train, {' and '.join(parts)} "
                f"(stratified). Fix: add images to it (from {need} a class gives {' and '.join(parts)} one "
                "each), or remove it"
            )
        train, *held = stratified_partition(labels, fractions, self.seed)
        for part in parts:
            self._origins[part] = ("fraction" if part == "val" else "test_fraction", where)
        held_by = dict(zip(parts, held, strict=True))
        percent = "/".join(f"{100 * f:.3g}" for f in (1 - sum(fractions), *fractions))
        sizes = ", ".join(f"{len(i)} {name}" for name, i in (("train", train), *held_by.items()))
        if "val" not in parts:
            sizes += f"; val is fold {self.cfg.get('fold') or 0} of data.folds={self.cfg['folds']} of train"
        log.info("flat folder %s: %d classes, split %s by seed %d (stratified): %s",
                 where, self.num_classes, percent, self.seed, sizes)  # fmt: skip
        return train, held_by.get("val"), held_by.get("test")

    def _subset(self, n, labels, seed_offset):
        return stratified_subset(labels, n, self.seed + seed_offset) if n else np.arange(len(labels))

    def _setup_in_memory(self, stage):
        x_test, y_test = self.standard.load(self.root, False)
        self._origins.update(
            train=("split", f"{self.name}'s training set"), test=("split", f"{self.name}'s test set")
        )
        keep = self._subset(self.cfg.get("test_subset"), y_test.numpy(), 2)
        self.test_set = TensorImageDataset(x_test[keep], y_test[keep], self.eval_transform())
        if stage == "test":
            return
        x, y = self.standard.load(self.root, True)
        train_idx, val_idx = self._split_off_val(y.numpy(), self._origins["train"][1])
        val_idx = val_idx[self._subset(self.cfg.get("val_subset"), y[val_idx].numpy(), 1)]
        train_idx = train_idx[self._subset(self.cfg.get("train_subset"), y[train_idx].numpy(), 0)]
        self.train_set = TensorImageDataset(x[train_idx], y[train_idx], self.train_transform())
        self.val_set = TensorImageDataset(x[val_idx], y[val_idx], self.eval_transform())

    def _setup_shards(self, stage):
        """data=shards: each split as written (visiontune.data.shards), read through this run's transforms."""
        trainer = self.trainer
        readers = max(1, self._num_workers()) * max(1, int(getattr(trainer, "num_devices", 1) or 1))
        for split in ("test",) if stage == "test" else ("train", "val", "test"):
            transform = self.train_transform() if split == "train" else self.eval_transform()
            setattr(self, f"{split}_set", self.shards.dataset(split, transform, readers))
            self._origins[split] = ("split", self.shards.source(split))
        if self.train_set is not None and self.task:
            self._train_targets = self.train_set.targets

    def _setup_folders(self, stage):
        """imagefolder and csv: scan every split (bad files out), then split, subset, fall back."""
        strict = bool(self.cfg.get("strict", False))
        classes = self.classes
        limit = self.cfg.get("max_pixels", DEFAULT_MAX_PIXELS)  # more pixels: skipped before decoding
        if self.task:
            sep, multitask = self.task.get("label_sep", "|"), self.task["name"] == "multitask"
            splits = {s: scan_task_csv(path, strict, self.heads, sep, multitask, max_pixels=limit)
                      for s, path in csv_files(self.root).items()}  # fmt: skip
        elif self.name == "csv":
            splits = {
                s: scan_csv(path, strict, classes, limit)[1:] for s, path in csv_files(self.root).items()
            }
        else:
            splits = {s: scan_source(src, strict, classes, limit)[1:] for s, src in self.layout[0].items()}
        for s in splits:
            source = csv_files(self.root)[s] if self.name == "csv" else self.layout[0][s]
            self._origins[s] = ("split", f"{source}/" if source.is_dir() else str(source))

        def take(split, indices):
            paths, labels = splits[split]
            splits[split] = ([paths[i] for i in indices], [labels[i] for i in indices])

        if self.name == "imagefolder" and self.layout[1]:  # one flat folder: split off val and test
            whole = splits["train"]
            for split, indices in zip(SPLITS, self._split_flat(whole[1]), strict=True):
                if indices is not None:
                    splits[split] = whole
                    take(split, indices)
        if self.cfg.get("folds") and "val" in splits:
            log.warning(
                "data.folds=%s: validating on a fold of train; the val split is not used", self.cfg["folds"]
            )
            del splits["val"]
        if "val" not in splits:
            tr, va = self._split_off_val(self._strata(splits["train"][1]), self._origins["train"][1])
            splits["val"] = splits["train"]
            take("val", va)
            take("train", tr)
        for offset, split in enumerate(("train", "val")):
            take(split, self._subset(self.cfg.get(f"{split}_subset"), self._strata(splits[split][1]), offset))
        if "test" not in splits:
            log.warning("%s has no test split: testing on the validation split", self.root)
            splits["test"] = splits["val"]
            self._origins["test"] = ("val", self._origins["val"][1])
        if self.cfg.get("test_subset"):
            take("test", self._subset(self.cfg["test_subset"], self._strata(splits["test"][1]), 2))
        dataset = TaskImageDataset if self.task else FileImageDataset
        self._train_targets = splits["train"][1]  # (task.pos_weight counts them, whatever wraps the set)
        self.train_set = dataset(*splits["train"], self.train_transform())
        self.val_set = dataset(*splits["val"], self.eval_transform())
        self.test_set = dataset(*splits["test"], self.eval_transform())
        for part in (self.train_set, self.val_set, self.test_set):
            part.max_pixels = limit

    # -- every split has images, and every class reaches every split (or one warning names those that do not)
    def empty_split(self, part: str) -> str | None:
        """Why the split `part` (train, val or test) has no image, as one line that says how to fix it;
        None when it has images or is not set up yet."""
        dataset = getattr(self, f"{part}_set")
        if dataset is None or len(dataset) > 0:
            return None
        how, where = self._origins.get(part, ("split", str(self.root)))
        if how == "val":  # no test split: the test is the val split's
            part, (how, where) = "val", self._origins["val"]
        head = f"data: the {part} split is empty"
        if part == "val" and self._how("test") == "val":
            head = "data: the val split, which the run also tests on (there is no test split), is empty"
        if how == "fraction":
            fraction = float(self.cfg.get("val_fraction", 0.1))
            if fraction <= 0:
                return (f"{head}: data.val_fraction=0 puts no image of {where} in val. Set data.val_fraction "
                        "(e.g. 0.2), or add a val split")  # fmt: skip
            largest = int(np.unique(self._train_strata(), return_counts=True)[1].max(initial=0))
            higher = next(
                (f for f in (0.2, 0.3, 0.4, 0.5) if f > fraction and held_out(largest, f) >= 1), None
            )
            fix = f"data.val_fraction={higher}, " if higher else ""
            return (f"{head}: data.val_fraction={fraction} puts an image of a class in val from "
                    f"{smallest_held_out(fraction)} images up, and the largest class of {where} has {largest}. "
                    f"Fix: {fix}more images, or a val split")  # fmt: skip
        if how == "test_fraction":
            return f"{head}: {self._too_few_for_test(where)}"
        if how == "folds":
            return (f"{head}: fold {self.cfg.get('fold') or 0} of data.folds={self.cfg['folds']} gets no image of "
                    f"{where} ({len(self.train_set)} images). Use fewer data.folds, or add images")  # fmt: skip
        return f"{head}: {where} has no usable image. Add images there"

    def _too_few_for_test(self, where: str) -> str:
        """Why a flat folder's test share came out empty, and the fix."""
        parts, counts = self._flat
        fraction, at = parts["test"], list(parts).index("test")
        largest = int(counts.max(initial=0))

        def gives(f: float) -> bool:
            fractions = [*list(parts.values())[:at], f]
            return sum(fractions) < 1 and shares(largest, fractions)[at] >= 1

        higher = next((f for f in (0.2, 0.3, 0.4) if f > fraction and gives(f)), None)
        need = smallest_class(list(parts.values()), [at])
        fix = f"data.test_fraction={higher}, " if higher else ""
        return (f"data.test_fraction={fraction} puts an image of a class in test from {need} images up, and the "
                f"largest class of {where} has {largest}. Fix: {fix}more images, or data.test_fraction=0 (test on "
                "val)")  # fmt: skip

    def check_splits(self, parts: tuple[str, ...] = ("train", "val", "test")) -> None:
        """Refuse (UserError, one line) a split among `parts` that has no image. A run calls this when it
        starts; `setup` already refuses every empty split but a val split that data.val_fraction=0 asked
        for (code may use the datamodule for its training split alone)."""
        for part in parts:
            problem = self.empty_split(part)
            if problem:
                raise UserError(problem)

    def _refuse_empty_splits(self, parts: tuple[str, ...]) -> None:
        # data.val_fraction=0 asks for an empty val split: a run refuses it when it starts (check_splits)
        asked = self._how("val") == "fraction" and float(self.cfg.get("val_fraction", 0.1)) <= 0
        for part in parts:
            if not (asked and self._how(part) in ("fraction", "val")):
                self.check_splits((part,))

    def _how(self, part: str) -> str:
        """How a split was made: `split` (files of its own), `fraction` or `folds` (carved out of train),
        `val` (no test split: the val split is tested on)."""
        return self._origins.get(part, ("split", ""))[0]

    def _train_strata(self) -> np.ndarray:
        """The training split's strata (`_strata`), one per image."""
        if self.standard:
            return np.asarray(self.train_set.labels)
        return self._strata(self._train_targets)

    def _warn_missing_classes(self, parts: tuple[str, ...]) -> None:
        """One warning naming the classes that a split has no image of: its metrics leave them out (a
        class of one image stays in train only, and a small val_fraction or subset may give a rare class
        none). Not for task=multilabel|multitask, whose splits are not stratified by class."""
        if self.task:
            return
        gaps: dict[tuple[int, ...], list[str]] = {}
        for part in parts:
            dataset = getattr(self, f"{part}_set")
            if dataset is not None and len(dataset) > 0:
                missing = tuple(missing_classes(np.asarray(dataset.labels), self.num_classes))
                if missing:
                    gaps.setdefault(missing, []).append(part)
        if not gaps:
            return
        listing = "; ".join(
            f"{' and '.join(lack)} {'lacks' if len(lack) == 1 else 'lack'} {[self.classes[c] for c in missing]}"
            for missing, lack in gaps.items()
        )
        fixes = [] if self.standard else ["add images to those classes"]
        fraction = float(self.cfg.get("val_fraction", 0.1))
        need = smallest_held_out(fraction) if self._how("val") == "fraction" else None
        unheld = [c for missing, lack in gaps.items() if "val" in lack for c in missing]
        if need and (np.bincount(self.train_labels(), minlength=self.num_classes)[unheld] < need).any():
            fixes.append(
                f"raise data.val_fraction (at {fraction} a class gives val one image from {need} images)"
            )
        lacking = {p for lack in gaps.values() for p in lack}
        if "test" in lacking and self._how("test") == "test_fraction":
            fixes.append("raise data.test_fraction")
        fixes += [
            f"raise data.{p}_subset"
            for p in ("train", "val", "test")
            if p in lacking and self.cfg.get(f"{p}_subset")
        ]
        if not self.standard and not (self.name == "imagefolder" and self.layout[1]):
            fixes.append("give val and test splits of their own")
        log.warning(
            "data: some classes have no image in a split, so its metrics leave them out: %s. Fix: %s",
            listing,
            ", or ".join(fixes),
        )

    def _strata(self, labels: list) -> np.ndarray:
        """What splits and subsets stratify on: the class; for a task, its first multiclass head's
        class (missing = a stratum of its own), or nothing (a seeded random split)."""
        if not self.task:
            return np.asarray(labels)
        first = next((h["name"] for h in self.heads if h.get("kind", "multiclass") == "multiclass"), None)
        return np.asarray([int(t[first]) if first else 0 for t in labels])

    def task_hparams(self) -> dict | None:
        """The task as the model stores it: the config, with each head's classes and, with
        task.pos_weight=true, its BCE pos_weight (negatives / positives per label on the training split)."""
        if not self.task:
            return None
        heads = [dict(h) for h in self.heads]
        if self.task.get("pos_weight"):
            if self.train_set is None:
                self.setup("fit")
            for h in heads:
                if h.get("kind") == "multilabel":
                    targets = np.stack([t[h["name"]] for t in self._train_targets])
                    positives = (targets == 1).sum(0)
                    negatives = (targets == 0).sum(0)
                    h["pos_weight"] = np.where(
                        positives > 0, negatives / np.maximum(positives, 1), 1.0
                    ).tolist()
        return {**self.task, "heads": heads}

    # -- the decoded-image cache
    def _cache_decoded(self, stage: str | None) -> None:
        """data.cache=memory|disk: decode and resize each image file once (visiontune.data.cache)."""
        mode = self.cfg.get("cache", "none")
        if mode == "none":
            return
        if self.augment.get("name") in RANDOM_CROP_PRESETS:
            raise UserError(
                f"data.cache={mode} with augment={self.augment['name']}: its random resized crops need the full "
                "decoded image, the cache holds it resized to the model's size. Use data.cache=none, or a preset "
                "without random crops (flip, affine, color, randaugment, ...)"
            )
        cache_dir = (
            self.cfg.get("cache_dir") or (self.root if self.root.is_dir() else self.root.parent) / ".cache"
        )
        for split in ("test_set",) if stage == "test" else ("train_set", "val_set", "test_set"):
            dataset = getattr(self, split)
            if dataset is not None:
                cached = cache_decoded(
                    dataset,
                    mode,
                    cache_dir,
                    self.image_size,
                    self.crop_pct,
                    self.interpolation,
                    self._num_workers(),
                )
                setattr(self, split, cached)

    # -- batched transforms on the device (data.device_transforms)
    def enable_device_transforms(self, setting="auto") -> bool:
        """Send the in-memory splits (or, asked for with true, shards) to the device as uint8 batches and
        transform them there.

        auto: wherever it applies (an in-memory dataset, a preset with a batched equivalent); true:
        required (refused with the reason elsewhere), and shards too; false: never. Returns whether it is on.
        """
        if setting is False or self.device_transforms is not None:
            return self.device_transforms is not None
        self.setup("fit")
        splits = [self.train_set, self.val_set, self.test_set]
        why_not = None
        shards = (
            self.name == SHARDS and setting is True
        )  # uint8 images at one size: on request (not measured)
        if not self.standard and not shards:
            why_not = (f"data={self.name} is read from files (device transforms need an in-memory dataset, or "
                       "data=shards)")  # fmt: skip
        elif self.augment.get("name", "none") not in DEVICE_PRESETS or self.augment.get("jsd"):
            why_not = f"augment={self.augment.get('name')} has no batched equivalent ({', '.join(DEVICE_PRESETS)} have)"
        elif not all(type(s) in (TensorImageDataset, ShardImageDataset) for s in splits if s is not None):
            why_not = "the splits are not plain in-memory images (e.g. cached features)"
        if why_not:
            if setting is True:
                raise UserError(f"data.device_transforms=true: {why_not}. Use data.device_transforms=auto")
            return False
        spec = (self.image_size, self.mean, self.std, self.interpolation, self.crop_pct)
        self.device_transforms = (BatchTransform(self.augment, *spec), BatchTransform(None, *spec))
        for split in splits:
            if split is not None:
                split.transform = None  # uint8 batches; on_after_batch_transfer transforms them
        log.info("data.device_transforms: uint8 batches are resized, augmented and normalised on the device")
        return True

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.device_transforms is None or batch is None or not _is_uint8(batch[0]):
            return batch  # (cached activations, visiontune.models.backbones.Activations, pass as they are)
        x, *rest = batch
        trainer = self.trainer
        if trainer is not None and trainer.training:
            step = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            x = self.device_transforms[0](x, batch_generator(self.seed, trainer.current_epoch, step))
        else:
            x = self.device_transforms[1](x)
        return [x, *rest]

    # -- loaders
    def _num_workers(self) -> int:
        n = self.cfg.get("num_workers")
        if n is not None:
            return int(n)
        if self.standard:
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
            collate_fn=collate_skip_none,  # file-backed and cached datasets give None for unreadable items
            drop_last=False,
            worker_init_fn=ignore_interrupts,  # a signal to the process group is the main process's to handle
        )

    def train_labels(self) -> np.ndarray:
        """The training split's classes, one per image (not for task=multilabel|multitask)."""
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

    def serve_instead(self, stand_in: Callable[[str], Dataset | None] | None) -> None:
        """Have the loaders read `stand_in(part)` in place of a split (train_set, val_set, test_set) whenever
        it gives a dataset, and the split itself when it gives None; `None`: the splits themselves always.

        The frozen-feature cache (`visiontune.training.features.FeatureCache`) serves its cached
        activations so, while the layers that produced them are frozen.
        """
        self.stand_in = stand_in

    def _served(self, part: str) -> Dataset:
        """The dataset a loader reads for `part` now: a stand-in's, or the split's own."""
        served = self.stand_in(part) if self.stand_in is not None else None
        return served if served is not None else getattr(self, part)

    def train_dataloader(self) -> DataLoader:
        """The training loader: this rank's part of the epoch order (EpochShuffleSampler), each image
        augmented from its own seed (SeededSamples)."""
        weights = None
        if self.balance == "sampler":  # each class drawn equally often, with replacement
            weights = 1.0 / np.maximum(self.class_counts()[self.train_labels()], 1)
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffleSampler(
            len(self.train_set), self.seed, weights, getattr(self.train_set, "groups", None), replicas, rank,
            int(self.cfg["batch_size"]), seeded=True, workers=self._num_workers(),
        )  # fmt: skip
        return self._loader(SeededSamples(self._served("train_set")), shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._served("val_set"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._served("test_set"), shuffle=False)


def _is_uint8(x) -> bool:
    """A batch of uint8 images, which the device transforms take (not cached activations)."""
    return isinstance(x, torch.Tensor) and x.dtype == torch.uint8
