"""data.cache=memory|disk: decoded once, the same tensors as decoding, keyed by the files, rebuilt when stale."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from helpers import write_images
from PIL import Image

from visiontune.data import ImageDataModule

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
               "interpolation": "bilinear", "crop_pct": 0.875}  # fmt: skip


def folder(root, n=12):
    """train/<digit class>/ with JPEGs and PNGs, one of them not square, and test/."""
    for split, start in (("train", 0), ("test", 100)):
        for label, suffix in (("a", ".jpg"), ("b", ".png")):
            write_images(root / split / label, n, suffix, start=start + (0 if label == "a" else n))
    wide = np.random.default_rng(0).integers(0, 256, (24, 41, 3), dtype=np.uint8)  # not square, odd margin
    Image.fromarray(wide).save(root / "train" / "a" / "wide.png")
    return root


def datamodule(root, **data):
    cfg = {"name": "imagefolder", "root": str(root), "batch_size": 4, "num_workers": 0, "val_fraction": 0.25,
           "image_size": 32, **data}  # fmt: skip
    dm = ImageDataModule(cfg, {"name": "none"}, DATA_CONFIG)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.95])  # 0.95: odd margins (33 -> 32 px)
def test_cached_images_give_the_same_tensors_as_decoding(tmp_path, crop_pct):
    root = folder(tmp_path / "d")
    plain = datamodule(root, crop_pct=crop_pct)
    cached = datamodule(root, crop_pct=crop_pct, cache="memory")
    for split in ("train_set", "val_set", "test_set"):
        a, b = getattr(plain, split), getattr(cached, split)
        assert len(a) == len(b) and type(b).__name__ == "DecodedImageDataset"
        for i in range(len(a)):
            (xa, ya), (xb, yb) = a[i], b[i]
            assert ya == yb
            assert torch.equal(xa.as_subclass(torch.Tensor), xb.as_subclass(torch.Tensor)), (split, i)


def test_disk_cache_is_reused_rebuilt_when_a_file_changes_and_when_corrupt(tmp_path, caplog):
    root, cache = folder(tmp_path / "d"), tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="visiontune"):
        first = datamodule(root, cache="disk", cache_dir=str(cache))
    assert "decoded" in caplog.text and len(list(cache.glob("images-*.npy"))) == 6  # 3 splits, images + mask
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        second = datamodule(root, cache="disk", cache_dir=str(cache))
    assert "read from" in caplog.text and "decoded" not in caplog.text
    assert torch.equal(first.train_set[0][0], second.train_set[0][0])
    # a changed file is another key: decoded again, and the new pixels are served
    changed = sorted((root / "test" / "a").glob("*.jpg"))[0]
    Image.new("L", (28, 28), 255).save(changed)
    os.utime(changed, ns=(1, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        third = datamodule(root, cache="disk", cache_dir=str(cache))
    assert "decoded" in caplog.text
    i = third.test_set.paths.index(str(changed))
    assert third.test_set[i][0].min() > 0.9 * third.test_set[i][0].max()  # all white, normalised
    # a truncated array is detected and rebuilt
    for f in cache.glob("images-*.npy"):
        f.write_bytes(f.read_bytes()[:-16])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        fourth = datamodule(root, cache="disk", cache_dir=str(cache))
    assert "corrupt or stale" in caplog.text
    assert torch.equal(fourth.train_set[0][0], first.train_set[0][0])


def test_an_unwritable_cache_dir_falls_back_to_memory(tmp_path, caplog):
    root = folder(tmp_path / "d")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        dm = datamodule(root, cache="disk", cache_dir=str(blocked / "cache"))
    assert "in memory only" in caplog.text
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)


def test_a_file_broken_after_the_scan_is_still_reported(tmp_path):
    root = folder(tmp_path / "d")
    dm = ImageDataModule({"name": "imagefolder", "root": str(root), "batch_size": 4, "num_workers": 0,
                          "image_size": 32, "cache": "memory"}, {"name": "none"}, DATA_CONFIG)  # fmt: skip
    from visiontune.data import cache as cache_mod

    real = cache_mod.load_image

    def flaky(path):
        if str(path).endswith("wide.png"):
            raise OSError("truncated file")
        return real(path)

    cache_mod.load_image = flaky
    try:
        with pytest.warns(UserWarning, match="skipping unreadable image .*wide.png"):
            dm.setup("fit")
    finally:
        cache_mod.load_image = real
    dataset = next(s for s in (dm.train_set, dm.val_set) if any(p.endswith("wide.png") for p in s.paths))
    i = next(i for i, p in enumerate(dataset.paths) if p.endswith("wide.png"))
    assert dataset[i] is None and np.sum(~dataset.readable) == 1
    # the loaders skip it: one image fewer, no crash
    loader = dm.train_dataloader() if dataset is dm.train_set else dm.val_dataloader()
    assert sum(len(y) for _, y in loader) == len(dataset) - 1


def test_random_crop_presets_are_refused(tmp_path):
    from visiontune.errors import UserError

    root = folder(tmp_path / "d")
    cfg = {"name": "imagefolder", "root": str(root), "batch_size": 4, "num_workers": 0, "image_size": 32,
           "cache": "memory"}  # fmt: skip
    with pytest.raises(
        UserError, match="augment=basic: its random resized crops need the full decoded image"
    ):
        ImageDataModule(cfg, {"name": "basic"}, DATA_CONFIG).setup("fit")
