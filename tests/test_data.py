"""Data: stratified splits, transforms that agree, image folders with bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visiontune.data import (
    EpochShuffleSampler,
    ImageDataModule,
    load_image,
    scan_folder,
    stratified_split,
    stratified_subset,
)
from visiontune.errors import UserError
from visiontune.transforms import PRESETS, eval_transform, train_transform

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}


def test_stratified_subset_keeps_class_proportions_and_is_seeded():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    idx = stratified_subset(labels, 100, seed=1)
    assert len(idx) == 100 and len(set(idx)) == 100
    assert np.bincount(labels[idx]).tolist() == [10, 20, 30, 40]
    assert np.array_equal(idx, stratified_subset(labels, 100, seed=1))
    assert not np.array_equal(idx, stratified_subset(labels, 100, seed=2))


def test_stratified_split_is_disjoint_and_proportional():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, val = stratified_split(labels, 0.2, seed=0)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 100
    assert np.bincount(labels[val]).tolist() == [10, 6, 4]


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(50, 3), EpochShuffleSampler(50, 3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)


def test_augment_none_is_the_eval_transform_exactly():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    for crop_pct in (1.0, 0.875):
        ev = eval_transform(64, (0.5,) * 3, (0.5,) * 3, "bicubic", crop_pct)
        tr = train_transform({"name": "none"}, 64, (0.5,) * 3, (0.5,) * 3, "bicubic", crop_pct)
        out = tr(image)
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        assert torch.equal(out, ev(image))


def test_small_images_are_resized_not_cropped():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[:, :, 0] = 255  # a bright left border must survive
    out = eval_transform(56, (0.0,) * 3, (1.0,) * 3, "bilinear", 1.0)(image)
    assert out[0, :, 0].min() > 0.9


@pytest.mark.parametrize("preset", PRESETS)
def test_augment_presets(preset):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    transform = train_transform({"name": preset}, 32, (0.5,) * 3, (0.5,) * 3, "bilinear", 0.875)
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(0)
    b = transform(image)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b), "same seed must give the same sample"
    assert a.abs().max() < 10
    if preset != "none":
        outs = [transform(image) for _ in range(8)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:]), f"{preset} is not random"


def write_folder(root, classes=("cat", "dog"), n=6, size=(20, 16)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
                root / c / f"{i}.jpg"
            )


def test_bad_files_are_reported_by_path_and_skipped(tmp_path):
    root = tmp_path / "train"
    write_folder(root)
    good = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="skipping 3 bad files") as record:
        classes, paths, labels = scan_folder(root, strict=False)
    message = str(record[0].message)
    for name in ("truncated.jpg", "empty.png", "notes.txt"):
        assert name in message
    assert classes == ["cat", "dog"] and len(paths) == 12
    with pytest.raises(UserError, match="3 bad files"):
        scan_folder(root, strict=True)


def test_empty_class_and_missing_root_are_clear_errors(tmp_path):
    write_folder(tmp_path / "train")
    (tmp_path / "train" / "empty_class").mkdir()
    with pytest.raises(UserError, match="no usable images.*empty_class"):
        scan_folder(tmp_path / "train", strict=False)
    with pytest.raises(UserError, match="does not exist"):
        ImageDataModule(
            {"name": "imagefolder", "root": str(tmp_path / "nope"), "batch_size": 4},
            {"name": "none"},
            DATA_CONFIG,
        )


def test_any_image_mode_loads_as_rgb(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    Image.new("P", (8, 8)).save(tmp_path / "palette.png")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpg")
    ev = eval_transform(16, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    for name in ("rgba.png", "palette.png", "deep.png", "cmyk.jpg"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB", name
        assert ev(image).shape == (3, 16, 16)


def test_imagefolder_datamodule_splits_and_tests_on_val(tmp_path):
    write_folder(tmp_path / "train", n=10)
    (tmp_path / "train" / "cat" / "x.txt").write_text("x")
    dm = ImageDataModule(
        {
            "name": "imagefolder",
            "root": str(tmp_path),
            "batch_size": 4,
            "val_fraction": 0.2,
            "num_workers": 0,
        },
        {"name": "basic"},
        DATA_CONFIG,
    )
    with pytest.warns(UserWarning, match="skipping 1 bad files"):
        dm.setup("fit")
    assert dm.num_classes == 2 and len(dm.train_set) == 16 and len(dm.val_set) == 4
    assert dm.test_set is dm.val_set or len(dm.test_set) == 4
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64


def test_fashion_mnist_subset_sizes():
    dm = ImageDataModule(
        {"name": "fashion_mnist", "root": "data", "train_subset": 100, "val_subset": 50, "test_subset": 30,
         "image_size": 32, "crop_pct": 1.0, "batch_size": 10},
        {"name": "none"},
        DATA_CONFIG,
    )  # fmt: skip
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 50, 30)
    assert np.bincount(dm.train_set.labels.numpy()).tolist() == [10] * 10
    x, _ = dm.train_set[0]
    assert x.shape == (3, 32, 32)
