"""Data that breaks or runs short: no false success, no silent gaps.

- Image files that become unreadable mid-run end the run in one line that names the split, the epoch and
  the counts, before that epoch logs a metric or writes a checkpoint (`training.callbacks.ReadCheck`).
- A class that a split has no image of is named in one warning; a split that comes out empty is one
  line and exit code 2 before anything trains (`data.datamodule.ImageDataModule`).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import FAST, compose_cfg, data_config, run_main
from PIL import Image

from visiontune.data import ImageDataModule
from visiontune.errors import UserError
from visiontune.train import train
from visiontune.training.checkpoints import load_classifier


def colour_images(folder: Path, n: int, channel: int, seed: int) -> list[Path]:
    """n 16 px images whose `channel` is bright: two colours make classes a tiny model learns at once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
        pixels[..., channel] += 170
        Image.fromarray(pixels).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


def blue_red(root: Path, sizes: dict[str, int]) -> dict[str, list[Path]]:
    """root/<split>/{blue,red}/ with sizes[split] images per class; the files of each split."""
    return {
        split: [p for c, (name, channel) in enumerate((("blue", 2), ("red", 0)))
                for p in colour_images(root / split / name, n, channel, seed=10 * s + c)]
        for s, (split, n) in enumerate(sizes.items())
    }  # fmt: skip


def break_files(paths) -> None:
    for path in paths:
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n but nothing after the signature decodes")


class BreakFiles(L.Callback):
    """Makes `paths` unreadable after epoch `epoch`'s training and validation (None: when fit ends)."""

    def __init__(self, paths, epoch: int | None):
        self.paths, self.epoch = list(paths), epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            break_files(self.paths)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.epoch is None:
            break_files(self.paths)


def folder_run(root: Path, *overrides: str) -> list[str]:
    return [*FAST, "data=imagefolder", f"data.root={root}", "data.num_workers=0", "data.batch_size=8",
            "data.train_subset=null", "data.val_subset=null", "data.test_subset=null", "logger=csv",
            *overrides]  # fmt: skip


def logged(run_dir: Path, key: str) -> list[int]:
    """The epochs of the CSV logger's rows that hold `key`."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get(key)]


def broken_files(files: dict[str, list[Path]], which: str) -> list[Path]:
    """The files a case breaks: `all`, a split's, or `train:<k>` (the first k training files)."""
    if which == "all":
        return [p for paths in files.values() for p in paths]
    split, _, k = which.partition(":")
    return files[split][: int(k)] if k else files[split]


@pytest.mark.filterwarnings("ignore:skipping")
@pytest.mark.parametrize(
    ("which", "at", "expected"),
    [
        # every file breaks after epoch 0: epoch 1 trains on nothing (a failure at any min_read_fraction,
        # this case runs with 0)
        ("all", 0, "the train split read 0 of 16 images in epoch 1 (none of them)"),
        # 10 of the 16 training files: epoch 1 reads 6, under half
        ("train:10", 0, "the train split read 6 of 16 images in epoch 1 (under data.min_read_fraction=0.5)"),
        # the val files only: epoch 1 trains, then validates on nothing
        ("val", 0, "the val split read 0 of 8 images in epoch 1 (none of them)"),
        # the test files, once fit is done
        ("test", None, "the test split read 0 of 8 images when testing (none of them)"),
    ],
    ids=["all", "most-of-train", "val", "test"],
)
def test_files_that_break_mid_run_end_it_in_one_line_and_keep_the_last_good_epoch(
    which, at, expected, tmp_path
):
    """2 classes, 16 training images in 2 batches, 8 val and 8 test images; epoch 0 is whole."""
    files = blue_red(tmp_path / "ds", {"train": 8, "val": 4, "test": 4})
    run_dir = tmp_path / "run"
    epochs = 1 if at is None else 2
    threshold = 0 if which == "all" else 0.5
    overrides = [f"trainer.max_epochs={epochs}", f"data.min_read_fraction={threshold}"]
    cfg = compose_cfg(folder_run(tmp_path / "ds", *overrides), run_dir)
    with pytest.raises(UserError) as info:
        train(cfg, callbacks=[BreakFiles(broken_files(files, which), at)])
    message = str(info.value)
    assert expected in message and "\n" not in message, message

    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # epoch 0's, not the broken epoch's
    assert load_classifier(last).hparams.class_names == ["blue", "red"]  # and it loads whole
    assert logged(run_dir, "val/acc") == [0]  # no val row for the epoch that validated nothing
    assert logged(run_dir, "test/acc") == [] and not (run_dir / "metrics.json").exists()
    # what to do once the files are fixed
    assert f"ckpt_path={last if at == 0 else run_dir / 'checkpoints' / 'best.ckpt'}" in message


@pytest.mark.filterwarnings("ignore:skipping")
def test_a_few_files_that_break_mid_run_stay_a_warning(tmp_path):
    """3 of 24 training and 1 of 8 val files break after epoch 0: far above data.min_read_fraction=0.5,
    so the run goes on, over 2 of its 3 batches an epoch (limit_train_batches: it asks for 16 images)."""
    files = blue_red(tmp_path / "ds", {"train": 12, "val": 4})
    broken = files["train"][::8] + files["val"][:1]
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        folder_run(tmp_path / "ds", "trainer.max_epochs=2", "+trainer.limit_train_batches=2"), run_dir
    )
    train(cfg, callbacks=[BreakFiles(broken, 0)])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and "test/acc" in metrics
    assert logged(run_dir, "val/acc") == [0, 1]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------- splits: every class, never empty


def datamodule(root: Path, **data) -> ImageDataModule:
    cfg = {"name": "imagefolder", "root": str(root), "batch_size": 4, "num_workers": 0, **data}
    return ImageDataModule(cfg, {"name": "none"}, data_config())


def four_classes(root: Path, sizes: dict[str, int]) -> None:
    for c, (name, n) in enumerate(sizes.items()):
        colour_images(root / "train" / name, n, channel=c % 3, seed=c)


def test_a_class_left_out_of_val_and_test_is_named_in_one_warning(tmp_path, caplog):
    """emu has one image: it stays in train, so val (and test, which is val here) cannot measure it."""
    four_classes(tmp_path / "ds", {"ant": 10, "bee": 10, "cat": 10, "emu": 1})
    dm = datamodule(tmp_path / "ds")
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        dm.setup("fit")
    gaps = [r.getMessage() for r in caplog.records if "no image in a split" in r.getMessage()]
    assert len(gaps) == 1 and "\n" not in gaps[0], gaps
    assert "val and test lack ['emu']" in gaps[0] and all(
        c not in gaps[0] for c in ("'ant'", "'bee'", "'cat'")
    )
    assert "data.val_fraction" in gaps[0]  # and how to fix it
    assert sorted(set(dm.val_set.labels.tolist())) == [0, 1, 2] and 3 in dm.train_set.labels.tolist()

    caplog.clear()
    four_classes(tmp_path / "ok", {"ant": 10, "bee": 10, "cat": 10, "emu": 6})
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        datamodule(tmp_path / "ok").setup("fit")
    assert not [r for r in caplog.records if "no image in a split" in r.getMessage()]


def test_a_val_split_that_comes_out_empty_is_one_line_and_exit_2_before_training(tmp_path, capsys):
    """3 images a class at data.val_fraction=0.1 hold none out: refused at setup, with a value that works."""
    from visiontune.train import main

    four_classes(tmp_path / "ds", {"ant": 3, "bee": 3, "cat": 3, "emu": 3})
    run_dir = tmp_path / "run"
    code = run_main(main, *folder_run(tmp_path / "ds"), f"hydra.run.dir={run_dir}")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert "the val split, which the run also tests on (there is no test split), is empty" in lines[0]
    assert "Fix: data.val_fraction=0.2" in lines[0]
    assert not list(run_dir.rglob("*.ckpt"))
    fixed = datamodule(tmp_path / "ds", val_fraction=0.2)
    fixed.setup("fit")
    assert len(fixed.val_set) == 4  # the suggested value works: one image of each class


def test_val_fraction_0_without_a_val_split_is_refused_when_the_run_starts(tmp_path, capsys):
    """The datamodule allows an empty val split that data.val_fraction=0 asks for; a run, which validates
    on it, refuses it in one line before the first step."""
    from visiontune.train import main

    four_classes(tmp_path / "ds", {"ant": 6, "bee": 6})
    run_dir = tmp_path / "run"
    code = run_main(main, *folder_run(tmp_path / "ds", "data.val_fraction=0"), f"hydra.run.dir={run_dir}")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "data.val_fraction=0 puts no image of" in err and not list(run_dir.rglob("*.ckpt"))
    dm = datamodule(tmp_path / "ds", val_fraction=0.0)
    dm.setup("fit")  # the datamodule alone: all 12 images in train, no error
    assert len(dm.train_set) == 12 and len(dm.val_set) == 0
