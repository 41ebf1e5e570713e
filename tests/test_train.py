"""The command lines, end to end: a tiny run writes its run dir, eval reproduces it, bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY

from visiontune.train import train

FAST = [*TINY, "model.backbone=resnet18", "model.pretrained=false"]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_train_writes_run_dir_and_eval_reproduces_test_acc(tmp_path):
    result = run("visiontune.train", *FAST, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/acc", "test/acc", "test/loss", "train_time_s", "trainable_params", "frozen_params"):
        assert key in metrics, key
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (
        run_dir / "checkpoints" / "last.ckpt"
    ).is_file()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert any((run_dir / "tensorboard").glob("events.out.tfevents*"))
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["backbone"] == "resnet18"

    result = run(
        "visiontune.eval",
        f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model.backbone=no_such_net"], "unknown backbone 'no_such_net'"),
        (["data=imagefolder", "data.root=/nonexistent/x"], "/nonexistent/x does not exist"),
        (["optimizer=nope"], "Could not find 'optimizer/nope'"),
    ],
)
def test_bad_input_is_one_clear_line(args, expected, tmp_path):
    result = run("visiontune.train", *args, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    result = run("visiontune.eval", f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_linear_probe_run_counts_frozen_parameters(tiny_cfg, tmp_path):
    train(tiny_cfg("model.backbone=resnet18", "model.pretrained=false", "finetune=linear_probe"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trainable_params"] == 512 * 10 + 10
    assert metrics["frozen_params"] > 11_000_000


def test_counts_are_taken_at_fit_start_not_after_unfreezing(tiny_cfg, tmp_path):
    train(
        tiny_cfg(
            "model.backbone=resnet18",
            "model.pretrained=false",
            "finetune=freeze_unfreeze",
            "trainer.max_epochs=2",
        )
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trainable_params"] == 512 * 10 + 10


def test_compile_with_an_unfreezing_strategy_is_refused(tiny_cfg):
    from visiontune.errors import UserError

    with pytest.raises(UserError, match="torch.compile"):
        train(
            tiny_cfg(
                "model.backbone=resnet18",
                "model.pretrained=false",
                "finetune=freeze_unfreeze",
                "model.compile=true",
            )
        )


def test_imagefolder_cli_run_completes(tmp_path):
    """The issue's command line on a generated folder dataset (default backbone: pretrained Lite0)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, colour in (("red", 0), ("green", 1)):
            folder = tmp_path / "ds" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
                pixels[..., colour] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    args = [
        "data=imagefolder",
        f"data.root={tmp_path / 'ds'}",
        "trainer.max_epochs=1",
        "callbacks.progress.refresh_rate=0",
    ]
    result = run("visiontune.train", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_images"] == 22 and 0.0 <= metrics["test/acc"] <= 1.0
