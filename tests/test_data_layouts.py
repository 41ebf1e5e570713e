"""data=imagefolder as datasets come: a flat root/<class>/ folder (split into train, val and test), and
Hugging Face's imagefolder metadata (metadata.csv / metadata.jsonl with file_name and label)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, compose_cfg, data_config, run_main
from PIL import Image

from visiontune.data import ImageDataModule, load_image
from visiontune.errors import UserError

# one colour per class, so a loaded image tells which class it was written for
COLOURS = {
    "ant": (200, 0, 0),
    "bee": (0, 200, 0),
    "cat": (0, 0, 200),
    "3": (200, 200, 0),
    "10": (0, 200, 200),
}


def write_image(path: Path, name: str, i: int) -> None:
    """An 8 px PNG of class `name`'s colour; pixel (1, 1) numbers it, so that no two files are alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((8, 8, 3), dtype=np.uint8) + np.array(COLOURS[name], dtype=np.uint8)
    pixels[1, 1] = (i, i, i)
    Image.fromarray(pixels).save(path)


def flat_folder(root: Path, sizes: dict[str, int]) -> None:
    for name, n in sizes.items():
        for i in range(n):
            write_image(root / name / f"{i}.png", name, i)


def datamodule(root: Path, seed: int = 0, **data) -> ImageDataModule:
    cfg = {"name": "imagefolder", "root": str(root), "batch_size": 4, "num_workers": 0, **data}
    return ImageDataModule(cfg, {"name": "none"}, data_config(8), seed=seed)


def class_of(path: str) -> str:
    """The class an image was written for, read from its colour."""
    colour = load_image(path).getpixel((0, 0))
    return next(name for name, c in COLOURS.items() if c == colour)


def split_files(dm: ImageDataModule) -> dict[str, list[str]]:
    return {s: sorted(getattr(dm, f"{s}_set").paths) for s in ("train", "val", "test")}


# ---------------------------------------------------------------- a flat folder: split by the run


SIZES = {"ant": 10, "bee": 20, "cat": 30}  # a tenth of each is a whole number: no rounding at stake


def test_a_flat_folder_is_split_stratified_by_the_fractions_in_one_log_line(tmp_path, caplog):
    flat_folder(tmp_path / "ds", SIZES)
    dm = datamodule(tmp_path / "ds", seed=42)
    with caplog.at_level(logging.INFO, logger="visiontune"):
        dm.setup("fit")
    assert dm.classes == ["ant", "bee", "cat"]
    counts = {
        s: np.bincount(getattr(dm, f"{s}_set").labels, minlength=3).tolist() for s in ("train", "val", "test")
    }
    assert counts == {"train": [8, 16, 24], "val": [1, 2, 3], "test": [1, 2, 3]}  # every class in every split
    files = split_files(dm)
    every = sorted(str(p) for p in (tmp_path / "ds").rglob("*.png"))
    assert sorted(files["train"] + files["val"] + files["test"]) == every  # each file in exactly one split
    for split in files:  # and with its own class
        dataset = getattr(dm, f"{split}_set")
        assert all(class_of(p) == dm.classes[y] for p, y in zip(dataset.paths, dataset.labels, strict=True))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flat folder")]
    assert lines == [
        f"flat folder {tmp_path / 'ds'}/: 3 classes, split 80/10/10 by seed 42 (stratified): "
        "48 train, 6 val, 6 test"
    ]
    assert not [r for r in caplog.records if "no test split" in r.getMessage()]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and len(y) == 4


def test_the_flat_split_is_seeded(tmp_path):
    flat_folder(tmp_path / "ds", SIZES)
    splits = {}
    for seed in (0, 0, 1):
        dm = datamodule(tmp_path / "ds", seed=seed)
        dm.setup("fit")
        splits.setdefault(seed, []).append(split_files(dm))
    assert splits[0][0] == splits[0][1]  # the same seed: the same files in each split
    assert splits[1][0]["val"] != splits[0][0]["val"] and splits[1][0]["test"] != splits[0][0]["test"]
    dm = datamodule(tmp_path / "ds", seed=0)
    dm.setup("test")  # eval reads the test split alone: the same files
    assert sorted(dm.test_set.paths) == splits[0][0]["test"]


def test_a_flat_folder_with_test_fraction_0_or_folds(tmp_path):
    flat_folder(tmp_path / "ds", SIZES)
    dm = datamodule(tmp_path / "ds", test_fraction=0.0, val_fraction=0.2)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (48, 12) and dm.test_set.paths == dm.val_set.paths
    dm = datamodule(tmp_path / "ds", folds=3, fold=1)
    dm.setup("fit")
    assert np.bincount(dm.test_set.labels).tolist() == [1, 2, 3]  # test first; val is a fold of the rest
    assert len(dm.val_set) == 18 and len(dm.train_set) == 36
    assert set(dm.test_set.paths).isdisjoint(dm.val_set.paths + dm.train_set.paths)


# ---------------------------------------------------------------- Hugging Face metadata files


def metadata_split(folder: Path, rows: list[tuple[str, object]], fmt: str, extra: bool = False) -> None:
    """folder/metadata.<fmt> listing `rows` (file_name, label); the images under folder."""
    for i, (file_name, label) in enumerate(rows):
        write_image(folder / file_name, str(label), i)
    if fmt == "csv":
        header, line = (
            ("file_name,caption,label", "{},a caption,{}") if extra else ("file_name,label", "{},{}")
        )
        text = "\n".join([header, *(line.format(f, label) for f, label in rows)]) + "\n"
    else:
        text = "".join(json.dumps({"file_name": f, "label": label, "size": 8}) + "\n" for f, label in rows)
    (folder / f"metadata.{fmt}").write_text(text)


def test_metadata_csv_in_train_validation_and_test(tmp_path):
    """Labels by class name; extra columns are ignored; `validation/` is the val split."""
    root = tmp_path / "hub"
    names = ["cat", "ant", "bee"] * 2
    metadata_split(root / "train", [(f"images/{i}.png", n) for i, n in enumerate(names)], "csv", extra=True)
    metadata_split(root / "validation", [(f"{i}.png", n) for i, n in enumerate(["bee", "ant"])], "csv")
    metadata_split(root / "test", [(f"{i}.png", n) for i, n in enumerate(["ant", "cat", "cat"])], "csv")
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.classes == ["ant", "bee", "cat"]
    assert [dm.classes[y] for y in dm.val_set.labels] == ["bee", "ant"]
    assert [dm.classes[y] for y in dm.test_set.labels] == ["ant", "cat", "cat"]
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        assert all(class_of(p) == dm.classes[y] for p, y in zip(dataset.paths, dataset.labels, strict=True))
    assert sorted(Path(p).name for p in dm.train_set.paths) == [f"{i}.png" for i in range(6)]
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 8, 8) and [dm.classes[i] for i in y.tolist()] == ["bee", "ant"]


def test_metadata_jsonl_with_integer_labels_in_train_and_val(tmp_path):
    """Integer labels name their classes by their digits, sorted as names like every class list."""
    root = tmp_path / "hub"
    metadata_split(root / "train", [(f"{i}.png", label) for i, label in enumerate([10, 3, 10, 3])], "jsonl")
    metadata_split(root / "val", [("a.png", 3), ("b.png", "10")], "jsonl")  # a string label is the same class
    dm = datamodule(root)
    dm.setup("fit")
    assert dm.classes == ["10", "3"]
    assert [dm.classes[y] for y in dm.train_set.labels] == ["10", "3", "10", "3"]
    assert [dm.classes[y] for y in dm.val_set.labels] == ["3", "10"]
    assert all(class_of(p) == dm.classes[y] for p, y in zip(dm.val_set.paths, dm.val_set.labels, strict=True))
    image, label = dm.val_set[0]
    assert image.shape == (3, 8, 8) and label == 1


def test_a_flat_metadata_file_is_split_like_a_flat_folder(tmp_path):
    rows = [(f"img/{name}{i}.png", name) for name, n in SIZES.items() for i in range(n)]
    metadata_split(tmp_path / "ds", rows, "jsonl")
    dm = datamodule(tmp_path / "ds", seed=3)
    dm.setup("fit")
    assert np.bincount(dm.val_set.labels).tolist() == [1, 2, 3] == np.bincount(dm.test_set.labels).tolist()
    assert all(
        class_of(p) == dm.classes[y] for p, y in zip(dm.test_set.paths, dm.test_set.labels, strict=True)
    )


# ---------------------------------------------------------------- bad input: one line, with the fix


def one_line_error(dm: ImageDataModule) -> str:
    with pytest.raises(UserError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "\n" not in message and info.value.details is None
    return message


def test_a_flat_class_of_one_image_is_one_line_that_names_it(tmp_path, capsys):
    from visiontune.train import main

    flat_folder(tmp_path / "ds", {"ant": 6, "bee": 1, "cat": 6})
    message = one_line_error(datamodule(tmp_path / "ds", val_fraction=0.2, test_fraction=0.2))
    assert "class 'bee' has only 1 image" in message and "Fix: add images" in message
    assert "from 3 a class gives val and test one each" in message  # 2 x 0.2 rounds to 0, 3 x 0.2 to 1
    # the run says the same, in one line, exit code 2, before anything trains
    run_dir = tmp_path / "run"
    args = [
        *FAST,
        "data=imagefolder",
        f"data.root={tmp_path / 'ds'}",
        "data.num_workers=0",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_main(main, *args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "class 'bee' has only 1 image" in lines[0] and "Traceback" not in err, err
    assert not list(run_dir.rglob("*.ckpt"))


@pytest.mark.parametrize("file_name", ["../outside.png", "/tmp/outside.png", "images/../../outside.png"])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_name_outside_the_folder_is_refused(tmp_path, file_name, fmt):
    root = tmp_path / "hub"
    metadata_split(root / "train", [("0.png", "ant"), ("1.png", "bee")], fmt)
    metadata = root / "train" / f"metadata.{fmt}"
    if fmt == "csv":
        metadata.write_text(metadata.read_text() + f"{file_name},bee\n")
    else:
        metadata.write_text(
            metadata.read_text() + json.dumps({"file_name": file_name, "label": "bee"}) + "\n"
        )
    message = one_line_error(datamodule(root))
    assert message.startswith(
        f"{metadata} line {4 if fmt == 'csv' else 3}: file_name '{file_name}' points outside"
    )
    assert "Fix:" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("image,label\n0.png,ant\n", "has no `file_name` column; its header is ['image', 'label']"),
        ("file_name,class\n0.png,ant\n", "has no `label` column"),
        ('{"file_name": "0.png", "label": "ant"}\n{"file_name": "1.png"}\n', 'line 2: no "label" key'),
        ('{"file_name": "0.png", "label": 1.5}\n', "label must be a class name or an integer, got 1.5"),
        ("not json\n", "line 1: expected one JSON object a line"),
    ],
)
def test_a_metadata_file_without_its_columns_is_refused(tmp_path, text, expected):
    root = tmp_path / "hub"
    write_image(root / "train" / "0.png", "ant", 0)
    write_image(root / "train" / "1.png", "bee", 1)
    fmt = "jsonl" if text.startswith(("{", "not")) else "csv"
    (root / "train" / f"metadata.{fmt}").write_text(text)
    assert expected in one_line_error(datamodule(root))


def test_a_flat_test_share_that_comes_out_empty_says_which_fraction_works(tmp_path):
    flat_folder(tmp_path / "ds", {"ant": 3, "bee": 3})  # val takes 1 of each (3 x 0.4), test none (3 x 0.1)
    message = one_line_error(datamodule(tmp_path / "ds", val_fraction=0.4))
    assert message.startswith("data: the test split is empty: data.test_fraction=0.1 puts an image")
    assert "the largest class of" in message and "has 3. Fix: data.test_fraction=0.2" in message
    dm = datamodule(tmp_path / "ds", val_fraction=0.4, test_fraction=0.2)  # the suggested value works
    dm.setup("fit")
    assert len(dm.train_set) == len(dm.val_set) == len(dm.test_set) == 2


def test_ambiguous_split_folders_are_refused(tmp_path):
    flat_folder(tmp_path / "a" / "val", {"ant": 2})
    flat_folder(tmp_path / "a" / "validation", {"ant": 2})
    flat_folder(tmp_path / "a" / "train", {"ant": 2})
    assert "has both val/ and validation/" in one_line_error(datamodule(tmp_path / "a"))
    flat_folder(tmp_path / "b" / "test", {"ant": 2})  # a split folder without train/ is no flat folder
    assert "has test/ but no train/" in one_line_error(datamodule(tmp_path / "b"))
    flat_folder(tmp_path / "c", SIZES)
    with pytest.raises(UserError, match="test_fraction=0.5: must be below 1 - data.val_fraction=0.5"):
        datamodule(tmp_path / "c", val_fraction=0.5, test_fraction=0.5).setup("fit")


# ---------------------------------------------------------------- end to end


def test_a_run_trains_and_tests_on_a_flat_folder(tmp_path):
    from visiontune.train import train

    flat_folder(tmp_path / "ds", SIZES)
    run_dir = tmp_path / "run"
    overrides = [
        *FAST,
        "data=imagefolder",
        f"data.root={tmp_path / 'ds'}",
        "data.num_workers=0",
        "logger=csv",
    ]
    train(compose_cfg(overrides, run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["test/acc"] <= 1
    stored = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    assert stored["class_names"] == ["ant", "bee", "cat"] and stored["data"]["test_fraction"] == 0.1
