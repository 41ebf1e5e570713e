"""Data: stratified splits, transforms that agree, image folders with bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_cfg, data_config
from omegaconf import OmegaConf
from PIL import Image

from visiontune.cli import CONF_DIR
from visiontune.data import (
    EpochShuffleSampler,
    ImageDataModule,
    load_image,
    scan_folder,
    stratified_split,
    stratified_subset,
)
from visiontune.data.transforms import (
    COMMON_KEYS,
    PRESET_KEYS,
    PRESETS,
    batch_mix,
    eval_transform,
    train_transform,
)
from visiontune.errors import UserError

DATA_CONFIG = data_config()


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
    assert dm.test_set.paths == dm.val_set.paths  # no test/ folder: the run tests on val
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


# ---------------------------------------------------------------- augment presets and batch mixing


AUGMENT_CONFS = sorted(p for p in (Path(CONF_DIR) / "augment").glob("*.yaml") if not p.stem.startswith("_"))


def test_every_preset_has_a_config():
    names = {p.stem for p in AUGMENT_CONFS}
    assert set(PRESETS) <= names, set(PRESETS) - names
    assert {"mixup", "cutmix"} <= names


@pytest.mark.parametrize("conf", AUGMENT_CONFS, ids=lambda p: p.stem)
def test_augment_config_keys_are_the_presets_own(conf, tmp_path):
    assert conf.read_text().startswith("# "), "one-line comment first"
    augment = OmegaConf.to_container(compose_cfg([f"augment={conf.stem}"], tmp_path).augment)
    name = augment["name"]
    assert name == conf.stem
    assert set(COMMON_KEYS) <= set(augment)
    assert set(augment) == {*COMMON_KEYS, *PRESET_KEYS[name]}
    out = train_transform(augment, 32, (0.5,) * 3, (0.5,) * 3, "bilinear", 0.875)(
        torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    )
    assert out.shape == (3, 32, 32)
    if name in ("basic", "strong"):
        assert augment["scale"] == [0.08, 1.0]  # torchvision's RandomResizedCrop default


def test_unknown_preset_or_key_is_a_clear_error():
    with pytest.raises(UserError, match="unknown augment preset 'nope'"):
        train_transform({"name": "nope"}, 32, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    with pytest.raises(UserError, match="augment=flip has no keys \\['hlfip'\\]"):
        train_transform({"name": "flip", "hlfip": 0.5}, 32, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)


@pytest.mark.parametrize("alphas", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_batch_mix_gives_soft_targets(alphas):
    mix = batch_mix({"name": "flip", "mixup_alpha": alphas[0], "cutmix_alpha": alphas[1]}, num_classes=5)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    torch.manual_seed(0)
    mixed, targets = mix(images, labels)
    assert mixed.shape == images.shape
    assert targets.shape == (8, 5) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets >= 0).all()


def test_batch_mix_is_off_when_both_alphas_are_zero():
    assert batch_mix({"name": "flip", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}, 5) is None
    assert batch_mix({"name": "none"}, 5) is None


# ---------------------------------------------------------------- CSV lists, class checks, balance


def write_images(root, counts: dict[str, int], size=(12, 10)) -> list[tuple[str, str]]:
    """Small PNGs under root/images/<class>/; the (relative path, class) rows of a CSV."""
    rng = np.random.default_rng(0)
    rows = []
    for c, n in counts.items():
        (root / "images" / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
                root / "images" / c / f"{i}.png"
            )
            rows.append((f"images/{c}/{i}.png", c))
    return rows


def write_csv(path, rows, header=True):
    lines = (["path,label"] if header else []) + [f"{p},{c}" for p, c in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_module(root, augment="none", **data):
    return ImageDataModule(
        {"name": "csv", "root": str(root), "batch_size": 4, "num_workers": 0, **data},
        {"name": augment},
        DATA_CONFIG,
    )


def test_csv_dataset_splits_skips_bad_rows_and_tests_on_val(tmp_path):
    rows = write_images(tmp_path, {"zebra": 10, "ant": 20})
    (tmp_path / "notes.txt").write_text("not an image")
    rows += [("notes.txt", "ant"), ("images/ant/missing.png", "ant")]
    csv_path = write_csv(tmp_path / "list.csv", rows)
    dm = csv_module(csv_path, augment="basic", val_fraction=0.2)
    assert dm.classes == ["ant", "zebra"]  # sorted class names
    with pytest.warns(UserWarning, match="skipping 2 bad files") as record:
        dm.setup("fit")
    message = str(record[0].message)
    assert "notes.txt (not an image file)" in message and "missing.png (missing)" in message
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 6)
    assert np.bincount(dm.val_set.labels).tolist() == [4, 2]  # stratified
    assert set(dm.train_set.paths).isdisjoint(dm.val_set.paths)
    assert all(Path(p).is_file() for p in dm.train_set.paths)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    with pytest.raises(UserError, match="2 bad files"):
        csv_module(csv_path, strict=True).setup("fit")


def test_csv_folder_with_val_and_test_lists_and_no_header(tmp_path):
    rows = write_images(tmp_path, {"a": 6, "b": 6})
    write_csv(tmp_path / "train.csv", rows[:4] + rows[6:10], header=False)
    write_csv(tmp_path / "val.csv", [rows[4], rows[10]])
    write_csv(tmp_path / "test.csv", [rows[5], rows[11]])
    dm = csv_module(tmp_path)
    dm.setup("fit")
    assert dm.classes == ["a", "b"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 2, 2)
    assert dm.test_set.paths == [str(tmp_path / rows[5][0]), str(tmp_path / rows[11][0])]


def test_csv_missing_root_or_train_list_or_bad_line_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        csv_module(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="no train.csv"):
        csv_module(tmp_path).classes  # noqa: B018
    (tmp_path / "bad.csv").write_text("path,label\na.png,cat,extra\n")
    with pytest.raises(UserError, match="line 2: expected `path,label`"):
        csv_module(tmp_path / "bad.csv").classes  # noqa: B018


def test_csv_class_with_only_bad_files_is_a_clear_error(tmp_path):
    rows = write_images(tmp_path, {"cat": 4}) + [("gone.png", "dog")]
    dm = csv_module(write_csv(tmp_path / "list.csv", rows))
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no usable images.*'dog'"):
        dm.setup("fit")


def test_val_or_test_classes_not_in_train_are_an_error_that_names_them(tmp_path):
    write_folder(tmp_path / "train", classes=("cat", "dog"), n=3)
    write_folder(tmp_path / "val", classes=("cat", "bird", "emu"), n=2)
    dm = ImageDataModule({"name": "imagefolder", "root": str(tmp_path), "batch_size": 4}, {"name": "none"},
                         DATA_CONFIG)  # fmt: skip
    with pytest.raises(UserError, match="not in train/: \\['bird', 'emu'\\]"):
        dm.setup("fit")

    rows = write_images(tmp_path / "csv", {"cat": 3, "dog": 3, "bird": 1})
    write_csv(tmp_path / "csv" / "train.csv", rows[:6])
    write_csv(tmp_path / "csv" / "test.csv", rows[5:])
    with pytest.raises(
        UserError, match="test.csv has classes that are not in the training CSV: \\['bird'\\]"
    ):
        csv_module(tmp_path / "csv").setup("fit")


def test_loss_weights_are_inverse_frequency_with_mean_one(tmp_path):
    rows = write_images(tmp_path, {"common": 30, "rare": 10}, size=(4, 4))
    csv_path = write_csv(tmp_path / "list.csv", rows)
    weights = csv_module(csv_path, balance="loss_weights", val_fraction=0.0).class_weights()
    assert weights.dtype == torch.float32 and weights.shape == (2,)
    assert torch.allclose(weights, torch.tensor([0.5, 1.5]))  # 1/30 : 1/10, mean 1
    assert csv_module(csv_path, balance="none").class_weights() is None
    assert csv_module(csv_path, balance="sampler").class_weights() is None
    with pytest.raises(UserError, match="data.balance='oversample': must be one of none, sampler"):
        csv_module(csv_path, balance="oversample")


def test_balanced_sampler_oversamples_the_minority_class(tmp_path):
    rows = write_images(tmp_path, {"common": 40, "rare": 8}, size=(4, 4))
    dm = csv_module(write_csv(tmp_path / "list.csv", rows), balance="sampler", val_fraction=0.0)
    dm.setup("fit")
    labels = np.asarray(dm.train_set.labels)
    assert np.mean(labels == 1) == pytest.approx(1 / 6)
    sampler = dm.train_dataloader().sampler
    drawn = [labels[i] for epoch in range(5) for i, _seed in (sampler.set_epoch(epoch), list(sampler))[1]]
    assert len(drawn) == 5 * 48
    assert 0.4 < np.mean(np.asarray(drawn) == 1) < 0.6  # about half, not a sixth
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first, "the draw is a function of (seed, epoch): resume is exact"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 30)
