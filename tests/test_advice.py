"""The advice in a refusal is advice the user can take: it keeps their data, names the real limit,
and blames the setting that is wrong (not the data).

In-process and short: each case stops at its refusal (tiny runs, one of which takes 4 LR-finder steps).
"""

from __future__ import annotations

import pytest
from helpers import MODEL, compose_cfg
from PIL import Image

from visiontune.errors import UserError
from visiontune.export import export
from visiontune.train import train


def image_folder(root, counts: dict[str, int]):
    """root/<split>/<class>/*.png: two classes, `counts[split]` images each."""
    for split, n in counts.items():
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (40 * i % 255, 90 if label == "a" else 180, 0)).save(
                    folder / f"{i}.png"
                )
    return root


def test_the_cpu_refusal_for_your_own_folder_keeps_your_data(tiny_cfg, tmp_path, monkeypatch):
    """40 training images, 10 val, 10 test, and a forward pass timed at 10 ms an image: an epoch costs
    0.01 * (3 * 40 + 10) = 1.3 s and the test 0.1 s, so 5 epochs (6.6 s) exceed max_cpu_hours=0.001
    (3.6 s), and 2 epochs (2.7 s) are the most that fit. The advice says so, and never offers an
    experiment= overlay, which would train on its own dataset instead of this folder."""
    root = image_folder(tmp_path / "images", {"train": 20, "val": 5, "test": 5})
    monkeypatch.setattr("visiontune.build.forward_seconds_per_image", lambda model, size: 0.01)
    cfg = tiny_cfg(
        "data=imagefolder", f"data.root={root}", *MODEL, "trainer.max_epochs=5", "max_cpu_hours=0.001"
    )
    with pytest.raises(UserError) as info:
        train(cfg)
    message = str(info.value)
    assert "(40 training images x 5 epochs at 32 px)" in message
    assert "Shorten it on the same data: trainer.max_epochs=2 fits" in message
    for advice in ("data.image_size", "data.train_subset=N", "trainer=gpu", "max_cpu_hours=null"):
        assert advice in message
    assert "experiment=" not in message and "\n" not in message


@pytest.mark.parametrize(
    ("num_training", "expected"),
    [
        (
            100,
            "the data is too small for the LR finder: it has 4 training batches an epoch, so the finder ran 4 "
            "steps, and it needs at least 13. Fix: set optimizer.lr by hand (tune.lr_find=false), or give it "
            "more batches",
        ),
        (
            5,
            "the LR finder needs at least 13 steps for a suggestion and tune.num_training=5. Fix: tune.num_training",
        ),
    ],
)
def test_an_lr_finder_without_enough_steps_says_why(tiny_cfg, caplog, num_training, expected):
    """32 images in batches of 8 give the finder 4 steps in the run's one epoch: raising
    tune.num_training (the old advice) cannot help; the data is what is too small. Lightning's own
    error line about it is kept quiet: the refusal is the one line."""
    cfg = tiny_cfg(
        *MODEL, "tune.lr_find=true", f"tune.num_training={num_training}", "data.train_subset=32",
        "data.batch_size=8",
    )  # fmt: skip
    with pytest.raises(UserError) as info:
        train(cfg)
    assert str(info.value).startswith(expected)
    assert "Failed to compute suggestion" not in caplog.text
    if num_training >= 13:
        assert "tune.num_training" not in str(info.value)


@pytest.mark.parametrize("value", [0, -3, "all"])
def test_parity_images_below_1_blames_the_setting_not_the_data(tmp_path, value):
    """Refused before the checkpoint is even opened (this one does not exist): the setting is the problem."""
    cfg = compose_cfg(
        [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"parity_images={value}"], tmp_path, "export"
    )
    with pytest.raises(UserError, match=rf"^parity_images={value}: must be an integer >= 1") as info:
        export(cfg)
    assert "data.root" not in str(info.value)
