"""In-memory datasets come from one registry; the data rules are written once and shared."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import data_config

from visiontune.cli import CONF_DIR
from visiontune.data import ImageDataModule
from visiontune.data.checks import data_problem
from visiontune.data.standard import STANDARD, StandardDataset
from visiontune.data.wrapped import WrappedDataset
from visiontune.errors import UserError

DATA_CONFIG = data_config(16, crop_pct=1.0)
CLASSES = ("circle", "square", "star")


class TinyLoader:
    """A fake in-memory dataset: grey 8x8 images whose pixels equal their label but for the last one,
    their index; 20 per class in train and 5 in test. Records each (root, train) it is asked for."""

    def __init__(self):
        self.calls: list[tuple[Path, bool]] = []

    def __call__(self, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((root, train))
        per_class = 20 if train else 5
        labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
        images = labels.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
        images[:, 0, 7, 7] = torch.arange(len(labels), dtype=torch.uint8)
        return images, labels


def tiny_module(root, seed=3, **data) -> ImageDataModule:
    cfg = {"name": "tiny", "root": str(root), "batch_size": 8, "image_size": 16, "val_fraction": 0.25, **data}
    return ImageDataModule(cfg, {"name": "none"}, DATA_CONFIG, seed=seed)


def test_a_new_in_memory_dataset_is_one_registry_entry(tmp_path, monkeypatch):
    loader = TinyLoader()
    monkeypatch.setitem(STANDARD, "tiny", StandardDataset(CLASSES, loader))
    dm = tiny_module(tmp_path)
    assert dm.classes == list(CLASSES) and dm.num_classes == 3
    dm.prepare_data()
    assert loader.calls == [(tmp_path, False)]
    dm.setup("fit")
    # a stratified quarter of each class's 20 training images validates; the test split is whole
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (45, 15, 15)
    assert np.bincount(dm.val_set.labels.numpy()).tolist() == [5, 5, 5]
    assert dm._num_workers() == 0  # served from memory like the shipped ones
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32  # grey to RGB, resized, normalised
    # each image's pixels are its label: the transform kept every image with its own label
    assert torch.allclose(x[:, :, 0, 0], ((y.float() / 255 - 0.5) / 0.5)[:, None].expand(-1, 3))
    assert dm.enable_device_transforms("auto")  # batched device transforms apply as to the shipped ones


def test_the_same_seed_gives_the_same_split_of_a_registered_dataset(tmp_path, monkeypatch):
    monkeypatch.setitem(STANDARD, "tiny", StandardDataset(CLASSES, TinyLoader()))
    a, b, other = tiny_module(tmp_path), tiny_module(tmp_path), tiny_module(tmp_path, seed=4)
    fold = tiny_module(tmp_path, folds=4, fold=1)
    for dm in (a, b, other, fold):
        dm.setup("fit")

    def index(split):  # which images a split holds, in order (their last pixel)
        return split.images[:, 0, 7, 7].tolist()

    assert index(a.val_set) == index(b.val_set) and index(a.train_set) == index(b.train_set)
    assert sorted(index(a.val_set)) != sorted(index(other.val_set))
    assert np.bincount(fold.val_set.labels.numpy()).tolist() == [5, 5, 5]  # fold 1 of 4: a quarter a class
    assert set(index(fold.val_set)).isdisjoint(index(fold.train_set)) and len(fold.train_set) == 45


def test_every_registered_dataset_has_its_config_and_every_in_memory_config_is_registered():
    conf = Path(CONF_DIR) / "data"
    in_memory = set()
    for path in conf.glob("*.yaml"):
        node = yaml.safe_load(path.read_text())
        if "_standard" in node.get("defaults", []):
            in_memory.add(node["name"])
            assert node["name"] == path.stem
    assert in_memory == set(STANDARD)
    for name, entry in STANDARD.items():
        assert entry.classes and len(set(entry.classes)) == len(entry.classes), name


def test_an_unknown_dataset_names_every_registered_one(tmp_path, monkeypatch):
    monkeypatch.setitem(STANDARD, "tiny", StandardDataset(CLASSES, TinyLoader()))
    dm = ImageDataModule(
        {"name": "nope", "root": str(tmp_path), "batch_size": 4}, {"name": "none"}, DATA_CONFIG
    )
    with pytest.raises(
        UserError, match="unknown dataset 'nope'; choose fashion_mnist, .*tiny, imagefolder, csv"
    ):
        dm.classes  # noqa: B018


BAD = [
    ({"balance": "oversample"}, "data.balance='oversample': must be one of none, sampler, loss_weights"),
    ({"balance": None}, "data.balance=None: must be one of"),
    ({"cache": "ram"}, "data.cache='ram': must be one of none, memory, disk"),
    ({"folds": 1}, "data.folds=1: must be an integer >= 2"),
    ({"folds": True}, "data.folds=True: must be an integer >= 2"),
    ({"folds": 4, "fold": 4}, r"data.fold=4: must be an integer in \[0, 4\) \(data.folds=4\)"),
    ({"folds": 4, "fold": -1}, r"data.fold=-1: must be an integer in \[0, 4\)"),
    ({"fold": 1.5}, "data.fold=1.5: must be an integer >= 0"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[str(d) for d, _ in BAD])
def test_a_datamodule_built_without_the_config_check_refuses_what_it_refuses(
    data, message, tmp_path, monkeypatch
):
    monkeypatch.setitem(STANDARD, "tiny", StandardDataset(CLASSES, TinyLoader()))
    assert data_problem(data).startswith("invalid config value ")
    with pytest.raises(UserError, match=message):
        tiny_module(tmp_path, **data)


@pytest.mark.parametrize("data", [{}, {"folds": None, "fold": 0}, {"folds": 5, "fold": 4}, {"cache": "disk"},
                                  {"balance": "loss_weights", "folds": None, "fold": None}])  # fmt: skip
def test_good_data_settings_have_no_problem(data):
    assert data_problem(data) is None


class Doubled(WrappedDataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return 2 * self.base[i]


class Base(torch.utils.data.Dataset):
    labels = [0, 1, 1]

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return i


def test_a_wrapped_dataset_answers_for_its_base_and_survives_pickling():
    wrapped = Doubled(Base())
    assert wrapped.labels == [0, 1, 1] and wrapped[2] == 4
    with pytest.raises(AttributeError):
        wrapped.paths  # noqa: B018
    copy = pickle.loads(pickle.dumps(wrapped))  # unpickling reads attributes before `base` is set
    assert copy.labels == [0, 1, 1] and copy[1] == 2
