"""Curves and logs: curves.png by epoch, step scalars in short runs, img/s of training alone, quiet export and
compress. (A real run's curves.png and step scalars: test_train.py; the MLflow store: test_recipe.py.)"""

from __future__ import annotations

import io
import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from visiontune.training.callbacks import (
    RunClock,
    StepLogInterval,
    TrainingCurves,
    epoch_scalars,
    shared_lines,
)


def fake_trainer(**kwargs) -> SimpleNamespace:
    defaults = dict(
        is_global_zero=True,
        current_epoch=0,
        max_epochs=2,
        callback_metrics={},
        sanity_checking=False,
        fast_dev_run=False,
        optimizers=[],
    )
    return SimpleNamespace(**{**defaults, **kwargs})


# ------------------------------------------------------------------ img/s


def test_img_per_s_counts_the_time_of_the_training_batches_only(capsys):
    """Four batches of 16 images, 2 s each, around two validations of 100 s (one mid-epoch, one at the end):
    64 images in 8 s of training. Counting the whole epoch (210 s) would say 0 img/s."""
    now = [0.0]
    clock = RunClock(print_lines=True, clock=lambda: now[0])
    trainer = fake_trainer()
    batch = (torch.zeros(16, 3, 8, 8), torch.zeros(16))

    def at(t, hook, *args):
        now[0] = t
        getattr(clock, hook)(trainer, None, *args)

    at(0, "on_train_start")
    trainer.sanity_checking = True
    at(0, "on_validation_end")  # the sanity check: before the epoch, nothing to leave out
    trainer.sanity_checking = False
    at(1, "on_train_epoch_start")
    at(3, "on_train_batch_end", None, batch, 0)
    at(5, "on_train_batch_end", None, batch, 1)
    at(105, "on_validation_end")  # val_check_interval=0.5: validation from 5 s to 105 s
    at(107, "on_train_batch_end", None, batch, 2)
    at(109, "on_train_batch_end", None, batch, 3)
    at(209, "on_validation_end")  # the epoch's own validation
    at(211, "on_train_epoch_end")
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 1/2") and "  8 img/s  210 s  " in line, line
    assert clock.images == 64 and clock.epochs == 1


# ------------------------------------------------------------------ step scalars


@pytest.mark.parametrize(
    ("batches", "accumulate", "max_steps", "expected"),
    [(4, 1, -1, 4), (100, 1, -1, 25), (7, 2, -1, 4), (float("inf"), 1, -1, 25), (100, 1, 3, 3)],
)
def test_log_every_n_steps_is_at_most_one_epoch_of_optimizer_steps(batches, accumulate, max_steps, expected):
    trainer = fake_trainer(
        log_every_n_steps=25,
        num_training_batches=batches,
        accumulate_grad_batches=accumulate,
        max_steps=max_steps,
    )
    interval = StepLogInterval()
    interval.on_train_start(trainer, None)
    assert trainer.log_every_n_steps == expected
    # a second fit of the same trainer: the configured value is still the largest
    trainer.num_training_batches, trainer.max_steps = 1000, -1
    interval.on_train_start(trainer, None)
    assert trainer.log_every_n_steps == 25


# ------------------------------------------------------------------ curves.png


def test_curves_take_the_top_level_metrics_and_the_monitor_of_any_task():
    metrics = {
        "train/loss": torch.tensor(0.5),
        "train/loss_step": torch.tensor(0.4),
        "train/loss_epoch": torch.tensor(0.5),
        "train/shirt/loss": torch.tensor(0.7),
        "val/loss": torch.tensor(0.6),
        "val/score": torch.tensor(0.8),
        "val/shirt/acc": torch.tensor(0.9),
        "val/bag/map": torch.tensor(0.3),
    }
    assert epoch_scalars(metrics, "train/", "val/score") == {"train/loss": 0.5}
    val = epoch_scalars(metrics, "val/", "val/shirt/acc")
    assert val == pytest.approx({"val/loss": 0.6, "val/score": 0.8, "val/shirt/acc": 0.9})


def test_groups_with_the_same_lrs_share_a_line():
    epochs = [
        {"epoch": 1, "lr/backbone.0": 0.1, "lr/backbone.1": 0.1, "lr/backbone.2": 0.2, "lr/head": 0.1},
        {"epoch": 2, "lr/backbone.0": 0.05, "lr/backbone.1": 0.05, "lr/backbone.2": 0.1, "lr/head": 0.05},
    ]
    lines = shared_lines(epochs, ["lr/backbone.0", "lr/backbone.1", "lr/backbone.2", "lr/head"])
    assert lines == [("backbone.0 .. head (3 groups)", "lr/backbone.0"), ("backbone.2", "lr/backbone.2")]


def test_curves_png_is_redrawn_at_every_epoch_end_and_resumes_with_the_checkpoint(tmp_path):
    path = tmp_path / "curves.png"
    groups = [
        {"name": "backbone.0", "lr": 0.01},
        {"name": "backbone.0.no_decay", "lr": 0.01},
        {"name": "head", "lr": 0.1},
    ]
    trainer = fake_trainer(optimizers=[SimpleNamespace(param_groups=groups)])
    curves = TrainingCurves(path, monitor="val/map")
    drawn = []
    for epoch, value in enumerate((0.4, 0.6)):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val/loss": torch.tensor(1 - value), "val/map": torch.tensor(value)}
        curves.on_validation_end(trainer, None)
        trainer.callback_metrics = {**trainer.callback_metrics, "train/loss": torch.tensor(1.0 - value / 2)}
        curves.on_train_epoch_end(trainer, None)
        drawn.append(path.read_bytes())
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    assert drawn[0] != drawn[1] and sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]
    assert curves.epochs[1] == pytest.approx(
        {
            "epoch": 2,
            "train/loss": 0.7,
            "val/loss": 0.4,
            "val/map": 0.6,
            "lr/backbone.0": 0.01,
            "lr/head": 0.1,
        }
    )

    # resumed from a checkpoint of epoch 1's end (in a new process): epoch 2 again, which does not validate
    # this time, though callback_metrics still holds the last val values
    resumed = TrainingCurves(path, monitor="val/map")
    resumed.load_state_dict({"epochs": curves.state_dict()["epochs"][:1]})
    resumed.on_train_epoch_end(trainer, None)
    assert [row["epoch"] for row in resumed.epochs] == [1, 2] and "val/loss" in trainer.callback_metrics
    assert resumed.epochs[0] == curves.epochs[0] and "val/loss" not in resumed.epochs[1]  # no stale val point

    path.unlink()
    TrainingCurves(path, monitor="val/map").on_train_epoch_end(fake_trainer(fast_dev_run=1), None)
    assert not path.exists()


# ------------------------------------------------------------------ quiet export and compress


@pytest.fixture
def hydra_like_logging(tmp_path):
    """The root logger as a Hydra command sets it up: INFO, to the console and to <run>/<command>.log. Also a
    logger that keeps its records from root and has its own console handler, as Lightning's does."""
    root, lightning = logging.getLogger(), logging.getLogger("lightning.pytorch")
    saved = (root.handlers[:], root.level, lightning.handlers[:], lightning.propagate, lightning.level)
    console, lightning_console = io.StringIO(), io.StringIO()
    log_file = tmp_path / "command.log"
    root.handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    root.setLevel(logging.INFO)
    lightning.handlers = [logging.StreamHandler(lightning_console)]
    lightning.propagate = False
    lightning.setLevel(logging.INFO)

    def read():
        for handler in root.handlers:
            handler.flush()
        return console.getvalue() + lightning_console.getvalue(), log_file.read_text()

    yield read
    root.handlers[1].close()
    root.handlers, level, lightning.handlers, lightning.propagate, lightning_level = saved
    root.setLevel(level)
    lightning.setLevel(lightning_level)


def noisy_library(*args, **kwargs) -> None:
    """What the ONNX exporter's and the quantizer's libraries print: INFO lines, a warning on the root
    logger, a multi-line Python warning, and an error (which stays on the console)."""
    logging.getLogger("onnx_ir.passes.common.initializer_deduplication").info(
        "Replaced initializer 'val_138' with existing initializer 'val_100'"
    )
    logging.getLogger("onnxruntime.quantization.shape_inference").info(
        "Performing symbolic shape inference..."
    )
    logging.warning("Please consider to run pre-processing before quantization.")
    warnings.warn("Protobuf gencode version 5 is older than the runtime\nupdate the gencode", UserWarning, 2)
    logging.getLogger("onnxscript").error("a real problem")


def test_the_onnx_export_prints_nothing_of_its_libraries_but_errors(
    hydra_like_logging, tmp_path, monkeypatch
):
    from visiontune import export

    monkeypatch.setattr(torch.onnx, "export", noisy_library)
    export.export_onnx(
        torch.nn.Identity(), torch.zeros(2, 3, 8, 8), tmp_path / "m.onnx", "probabilities", None
    )
    logging.getLogger("visiontune").info("exported")  # the program's own lines are shown as before
    shown, log_file = hydra_like_logging()
    assert "Replaced initializer" not in shown and "symbolic shape" not in shown
    assert "a real problem" in shown and "exported" in shown
    assert "Replaced initializer" in log_file and "Performing symbolic shape inference" in log_file
    # the block is over: the same library's line reaches the console again
    logging.getLogger("onnx_ir").info("after the export")
    assert "after the export" in hydra_like_logging()[0]


def test_int8_quantization_keeps_onnxruntime_and_protobuf_warnings_in_the_log_file(
    hydra_like_logging, tmp_path, monkeypatch
):
    import onnx
    import onnxruntime.quantization as quantization
    import onnxruntime.quantization.shape_inference as shape_inference
    from onnx import TensorProto, helper

    from visiontune.compress import quantize_int8

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], name="softmax")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    fp32 = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), fp32)

    def pre_process(source, target):
        noisy_library()
        fp32.rename(target)

    def quantize(source, target, *args, **kwargs):
        noisy_library()
        assert kwargs["nodes_to_exclude"] == ["softmax"]
        (tmp_path / "model.int8.onnx").write_bytes(b"")

    monkeypatch.setattr(shape_inference, "quant_pre_process", pre_process)
    monkeypatch.setattr(quantization, "quantize_static", quantize)
    quantize_int8(fp32, tmp_path / "model.int8.onnx", None, "qoperator", tmp_path)
    shown, log_file = hydra_like_logging()
    assert shown.count("a real problem") == 2 and shown.count("\n") == 2, shown
    assert "Protobuf gencode" in log_file and "pre-processing before quantization" in log_file


def test_lightning_lines_of_a_quiet_block_go_to_the_log_file_though_its_logger_keeps_them_from_root(
    hydra_like_logging,
):
    from visiontune.cli import quiet_libraries

    with quiet_libraries(("lightning.pytorch",)):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    shown, log_file = hydra_like_logging()
    assert "GPU available" not in shown and "GPU available" in log_file
    assert logging.getLogger("lightning.pytorch").handlers[0].filters == []  # all undone
