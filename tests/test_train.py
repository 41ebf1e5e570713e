"""The command lines, end to end: a tiny run writes its run dir, eval reproduces it, bad input is one line."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import FAST, MODEL, SMALL, run, run_main

from visiontune.models.backbones import create_backbone
from visiontune.train import main as train_main
from visiontune.train import train


def test_train_writes_run_dir_and_eval_reproduces_test_acc(tmp_path):
    result = run("visiontune.train", *FAST, "callbacks.curves=true", f"hydra.run.dir={tmp_path / 'run'}")
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
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["model"]["backbone"] == SMALL

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
def test_bad_input_is_one_clear_line(args, expected, tmp_path, capsys):
    from visiontune.train import main

    code = run_main(main, *args, f"hydra.run.dir={tmp_path}")  # a traceback would raise here
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    from visiontune.eval import main

    code = run_main(main, f"ckpt_path={tmp_path / 'nope.ckpt'}", f"hydra.run.dir={tmp_path}")
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and err.count("\n") == 1, err


def test_linear_probe_run_counts_frozen_parameters(tiny_cfg, tmp_path):
    train(tiny_cfg(*MODEL, "finetune=linear_probe"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    backbone = create_backbone(SMALL, pretrained=False)
    assert metrics["trainable_params"] == backbone.num_features * 10 + 10  # the head alone
    assert metrics["frozen_params"] == sum(p.numel() for p in backbone.parameters())


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
    assert run_main(train_main, *args, f"hydra.run.dir={tmp_path / 'run'}") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # all of DIR (22 of 24 after the val split), tested on all 8 test images: accuracy is k/8
    assert metrics["train_images"] == 22 and metrics["epochs"] == 1
    assert (metrics["test/acc"] * 8) == pytest.approx(round(metrics["test/acc"] * 8), abs=1e-6)


class CurvesAtEpochEnd(L.Callback):
    """curves.png as each epoch's end left it (a test's callbacks come after the run's own)."""

    def __init__(self, path):
        self.path, self.drawn = path, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.drawn.append(self.path.read_bytes())


def test_metrics_json_records_the_best_value_of_the_monitor_under_its_own_name(tiny_cfg, tmp_path):
    """Also what the run logs as it goes: step scalars in a run of 4 steps an epoch (fewer than
    trainer.log_every_n_steps=25), and curves.png drawn again at every epoch end."""
    import csv

    monitor = ["callbacks.checkpoint.monitor=val/loss", "callbacks.checkpoint.mode=min"]
    curves = CurvesAtEpochEnd(tmp_path / "curves.png")
    value = train(
        tiny_cfg(*MODEL, "trainer.max_epochs=3", "callbacks.curves=true", *monitor), callbacks=[curves]
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(row["val/loss"]) for row in rows if row.get("val/loss")]
    assert len(logged) == 3
    assert metrics["val/loss"] == pytest.approx(min(logged)) and value == pytest.approx(min(logged))
    # log_every_n_steps becomes the epoch's 4 steps: the last step of each epoch logs its loss and LRs
    assert [row["step"] for row in rows if row.get("train/loss_step")] == ["3", "7", "11"]
    assert [row["step"] for row in rows if row.get("lr-AdamW/head")] == ["3", "7", "11"]
    assert len(curves.drawn) == 3 and len(set(curves.drawn)) == 3  # a new drawing at every epoch end
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in curves.drawn)
    assert (tmp_path / "curves.png").read_bytes() == curves.drawn[-1]


def test_plateau_follows_the_checkpoint_monitor_and_its_mode():
    from helpers import make_run

    class ValLoss(L.Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_validation_end(self, trainer, pl_module):
            self.losses.append(float(trainer.callback_metrics["val/loss"]))

    probe = ValLoss()
    plateau = {"name": "plateau", "patience": 0, "factor": 0.5, "threshold": 10.0}
    trainer, model, dm, _ = make_run({"name": "full"}, epochs=2, scheduler=plateau, callbacks=[probe])
    model.monitor = {"monitor": "val/loss", "mode": "min"}
    trainer.fit(model, datamodule=dm)
    best, bad, scale = model.plateau_state.tolist()
    assert best == pytest.approx(-probe.losses[0])  # the first val/loss, negated: lower is better
    assert scale == 0.5  # the second epoch did not improve by the threshold: one cut


def test_logs_to_a_file_get_one_plain_line_per_epoch(tmp_path, capsys):
    """stdout is not a terminal here (captured, as when it goes to a file): no bar, a line per epoch."""
    assert run_main(train_main, *FAST, "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("img/s" in line and "ETA" in line for line in lines)
    assert "\x1b[" not in out.split("visiontune run:")[0]  # no progress-bar escape codes


def test_a_run_longer_than_max_cpu_hours_is_refused_before_it_starts(tiny_cfg, tmp_path):
    from visiontune.errors import UserError

    with pytest.raises(UserError, match=r"would take about .* more than max_cpu_hours=1e-06") as info:
        train(tiny_cfg(*MODEL, "max_cpu_hours=0.000001"))
    assert "max_cpu_hours=null" in str(info.value) and not (tmp_path / "checkpoints").exists()
