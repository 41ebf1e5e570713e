"""Reliability: no lost epochs, no false success, a clear line for every fault, exact resume after a signal."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, CrashAt, compose_cfg, shared_run
from PIL import Image

from visiontune.errors import UserError
from visiontune.train import train


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_last_ckpt_holds_the_final_epoch_when_the_monitor_stops_improving(tmp_path):
    """best.ckpt stays at epoch 0 (val/acc never improves at LR 1e-12); last.ckpt still has every epoch."""
    train(
        compose_cfg([*FAST, "trainer.max_epochs=4", "optimizer.lr=1e-12", "finetune=linear_probe"], tmp_path)
    )
    best, last = ckpt(tmp_path / "checkpoints" / "best.ckpt"), ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert best["epoch"] == 0
    assert last["epoch"] == 3 and last["global_step"] == 4 * 4  # 64 images / batch 16 = 4 steps per epoch
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_last_ckpt_is_written_when_a_run_ends_mid_epoch(tmp_path):
    train(compose_cfg([*FAST, "trainer.max_epochs=3", "+trainer.max_steps=6"], tmp_path))
    assert ckpt(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 6


# ---------------------------------------------------------------- signals


SIGNAL_RUN = [
    "model.backbone=resnet18",
    "model.pretrained=false",
    "data.train_subset=384",
    "data.val_subset=32",
    "data.test_subset=32",
    "data.image_size=32",
    "data.batch_size=16",
    "trainer.max_epochs=3",
    "trainer.num_sanity_val_steps=0",
    "scheduler=cosine",
    "model.head.dropout=0.3",
    "logger=csv",
]


def start_run(run_dir, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "visiontune.train", *SIGNAL_RUN, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_in_epoch_1(proc: subprocess.Popen, signum: int) -> tuple[str, str]:
    """Send `signum` once the first epoch has ended (its progress line is printed), i.e. during epoch 1."""
    deadline = time.monotonic() + 300
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 1/3"):
            time.sleep(1.5)  # a few batches into epoch 1
            proc.send_signal(signum)
            break
        assert time.monotonic() < deadline, "the run never finished epoch 0"
    out, err = proc.communicate(timeout=300)
    return "".join(seen) + out, err


@pytest.fixture(scope="session")
def signal_straight(tmp_path_factory):
    """SIGNAL_RUN uninterrupted, once for both signals."""
    return shared_run(
        tmp_path_factory, "signal_straight", lambda folder: train(compose_cfg(SIGNAL_RUN, folder))
    )


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_resumable_checkpoint_and_resume_is_exact(signum, signal_straight, tmp_path):
    straight = signal_straight

    _, err = interrupt_in_epoch_1(start_run(tmp_path / "cut"), signum)
    proc_lines = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(proc_lines) == 1, err[-2000:]
    assert f"interrupted by {signal.Signals(signum).name} in epoch 1" in proc_lines[0]
    assert "Traceback" not in err and "weights_only" not in err  # no alarming noise with the checkpoint
    resume_from = proc_lines[0].split("ckpt_path=")[1].strip()
    assert resume_from.endswith("interrupted.ckpt") and os.path.isfile(resume_from)
    cut = ckpt(resume_from)
    assert cut["epoch"] == 1 and 384 // 16 <= cut["global_step"] < 2 * 384 // 16  # in epoch 1

    resumed = subprocess.run(
        [sys.executable, "-m", "visiontune.train", *SIGNAL_RUN, f"ckpt_path={resume_from}",
         f"hydra.run.dir={tmp_path / 'cut'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = ckpt(straight / "checkpoints" / "last.ckpt"), ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 3 * 384 // 16
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key


def test_the_exit_code_of_a_signal_is_128_plus_its_number(tmp_path):
    proc = start_run(tmp_path / "run")
    interrupt_in_epoch_1(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM


# ---------------------------------------------------------------- exact resume: one set of runs, many checks

RESUME = [
    *FAST,
    "trainer.max_epochs=2",
    "scheduler=none",  # the LR must not depend on max_epochs: `first` stops after 1 of them
    "model.head.dropout=0.3",  # the RNG state is part of what a resume restores
    "data.num_workers=1",  # a loader with a worker process draws its indices early (see ResumeMidEpoch)
    "data.device_transforms=false",
]


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session")
def resume_runs(tmp_path_factory):
    """The runs the exact-resume tests compare, trained once in the session (64 images, 4 steps an epoch):

    - straight: 2 epochs in one go;
    - first: the same, stopped after 1 epoch (max_epochs=1);
    - crashed: the 2-epoch run, crashing at batch 2 of epoch 1 (its log lines are kept);
    - epoch_end: first's last.ckpt, resumed to 2 epochs in a new run dir;
    - mid_epoch: crashed's on_exception.ckpt, resumed to 2 epochs in a new run dir.
    """
    return shared_run(tmp_path_factory, "resume", train_resume_runs)


def train_resume_runs(root):
    train(compose_cfg(RESUME, root / "straight"))
    train(compose_cfg([*RESUME, "trainer.max_epochs=1"], root / "first"))
    lines = LogLines()
    logger = logging.getLogger("visiontune")
    logger.addHandler(lines)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(compose_cfg(RESUME, root / "crashed"), callbacks=[CrashAt(epoch=1, batch=2)])
    finally:
        logger.removeHandler(lines)
    (root / "crash.log").write_text("\n".join(lines.lines))
    for name, start in (("epoch_end", "first/checkpoints/last.ckpt"),
                        ("mid_epoch", "crashed/checkpoints/on_exception.ckpt")):  # fmt: skip
        train(compose_cfg([*RESUME, f"ckpt_path={root / start}"], root / name))


@pytest.mark.parametrize("resumed", ["epoch_end", "mid_epoch"])
def test_resume_is_exact_from_an_epoch_end_and_from_the_middle_of_an_epoch(resume_runs, resumed):
    """A loader with workers draws its first indices when its iterator is made, which Lightning does before
    a resumed run's epoch (and mid-epoch skip) is set: the resumed epoch must still get its own order."""
    a = ckpt(resume_runs / "straight" / "checkpoints" / "last.ckpt")
    b = ckpt(resume_runs / resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2 * 4
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    ma = json.loads((resume_runs / "straight" / "metrics.json").read_text())
    mb = json.loads((resume_runs / resumed / "metrics.json").read_text())
    assert mb["epochs"] == 2
    assert mb["test/acc"] == pytest.approx(ma["test/acc"]) and mb["test/loss"] == pytest.approx(
        ma["test/loss"], rel=1e-5
    )


def test_a_crash_mid_epoch_leaves_last_ckpt_at_the_epoch_end_and_an_exception_checkpoint(resume_runs):
    checkpoints = resume_runs / "crashed" / "checkpoints"
    last, first = ckpt(checkpoints / "last.ckpt"), ckpt(resume_runs / "first" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and last["global_step"] == first["global_step"] == 4
    for key, value in first["state_dict"].items():  # the weights of epoch 0's end, as a resume needs them
        assert torch.equal(value, last["state_dict"][key]), key
    cut = ckpt(checkpoints / "on_exception.ckpt")
    assert cut["epoch"] == 1 and cut["global_step"] == 4 + 2  # two batches into epoch 1
    assert not list(checkpoints.glob("*.tmp"))


def test_a_crash_names_checkpoints_that_exist(resume_runs):
    named = [
        w.split("=")[1].rstrip(")")
        for w in (resume_runs / "crash.log").read_text().split()
        if w.startswith("ckpt_path=")
    ]
    assert len(named) == 2 and all(os.path.isfile(p) for p in named)  # on_exception.ckpt and last.ckpt


def test_throughput_after_resume_counts_only_this_process(resume_runs):
    metrics = json.loads((resume_runs / "epoch_end" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["epochs_this_run"] == 1
    images = metrics["images_per_s"] * metrics["train_time_s"]
    assert images == pytest.approx(64, rel=0.05)  # one epoch of 64 images, not two


# ---------------------------------------------------------------- resume checks


def write_classes(root, names):
    for i, name in enumerate(names):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(6):
            Image.new("RGB", (12, 12), (40 * i, 20 * j, 100)).save(folder / f"{j}.png")


def colour_folder(root, swap_train_labels: bool = False) -> None:
    """Blue and red noise images in train/, val/ and test/; optionally every train image in the other class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("val", 8), ("test", 8)):
        for label, name in enumerate(("blue", "red")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            channel = 2 * (1 - label if swap_train_labels and split == "train" else label)  # blue: 0, red: 2
            for i in range(n):
                pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
                pixels[..., channel] += 170
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_resuming_into_a_new_run_dir_keeps_the_better_earlier_epoch_as_best(tmp_path):
    """Epoch 0 learns the colours (val/acc 1.0); the resumed epoch 1, in a new run dir, trains on swapped
    labels and is clearly worse. best.ckpt, the monitor's value and test/acc must stay epoch 0's."""
    colour_folder(tmp_path / "good")
    colour_folder(tmp_path / "swapped", swap_train_labels=True)
    base = [*FAST, "data=imagefolder", "data.train_subset=null", "data.val_subset=null",
            "data.test_subset=null", "logger=csv"]  # fmt: skip
    train(compose_cfg([*base, f"data.root={tmp_path / 'good'}"], tmp_path / "first"))
    first = json.loads((tmp_path / "first" / "metrics.json").read_text())
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed_args = [*base, f"data.root={tmp_path / 'swapped'}", "trainer.max_epochs=2", f"ckpt_path={last}"]
    train(compose_cfg(resumed_args, tmp_path / "resumed"))
    with open(tmp_path / "resumed" / "csv" / "metrics.csv") as f:
        epoch1 = [float(row["val/acc"]) for row in csv.DictReader(f) if row.get("val/acc")]
    assert first["val/acc"] >= 0.9 and epoch1 and epoch1[-1] <= 0.6  # epoch 0 is clearly the better one

    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    best = tmp_path / "resumed" / "checkpoints" / "best.ckpt"
    assert metrics["epochs"] == 2 and Path(metrics["best_ckpt"]).resolve() == best.resolve()
    assert ckpt(best)["epoch"] == 0  # the new run dir holds the better epoch as its own best.ckpt
    assert metrics["val/acc"] == pytest.approx(first["val/acc"])
    assert metrics["test/acc"] == pytest.approx(first["test/acc"]) and metrics["test/acc"] >= 0.9
    assert (tmp_path / "first" / "checkpoints" / "best.ckpt").is_file()  # the earlier run is untouched


def test_resume_refuses_data_whose_class_names_differ(tmp_path):
    data = tmp_path / "ds"
    write_classes(data, ["cat", "dog"])
    base = [*FAST, "data=imagefolder", f"data.root={data}", "data.val_fraction=0.34"]
    train(compose_cfg(base, tmp_path / "a"))
    (data / "train" / "dog").rename(data / "train" / "ant")  # same count, new order: ant, cat
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        UserError, match=r"only in the checkpoint: \['dog'\]; only in the data: \['ant'\]"
    ) as info:
        train(compose_cfg([*base, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "b"))
    assert "data.allow_class_mismatch=true" in str(info.value) and "\n" not in str(info.value)
    ok = [*base, "trainer.max_epochs=2", f"ckpt_path={last}", "data.allow_class_mismatch=true"]
    train(compose_cfg(ok, tmp_path / "c"))


def test_resuming_a_checkpoint_of_another_backbone_or_class_count_is_one_line(tmp_path):
    train(compose_cfg(FAST, tmp_path / "a"))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="holds a resnet18 model, this run builds vgg16") as info:
        train(compose_cfg([*FAST, "model.backbone=vgg16", f"ckpt_path={last}"], tmp_path / "b"))
    assert "\n" not in str(info.value)
    data = tmp_path / "ds"
    write_classes(data, ["cat", "dog"])
    two = [*FAST, "data=imagefolder", f"data.root={data}", "data.val_fraction=0.34", f"ckpt_path={last}"]
    with pytest.raises(UserError, match="the data has 2 classes, the checkpoint 10"):
        train(compose_cfg(two, tmp_path / "c"))


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100, "state_dict"])
def test_a_bad_checkpoint_to_resume_is_one_line(content, tmp_path):
    path = tmp_path / "bad.ckpt"
    if content == "state_dict":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as info:
        train(compose_cfg([*FAST, f"ckpt_path={path}"], tmp_path / "run"))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- setup errors are not crashes


def test_an_error_before_the_first_step_writes_no_checkpoint_and_no_resume_advice(tmp_path, caplog):
    crash = CrashAt(epoch=0, batch=0, message="broken before the first step")
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="broken before the first step"):
        train(compose_cfg(FAST, tmp_path), callbacks=[crash])
    assert (
        not list((tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").exists() else True
    )
    assert "ckpt_path" not in caplog.text


# ---------------------------------------------------------------- SLURM pre-emption

SLURM_ENV = {
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "vt-test",
    "SLURM_JOB_ID": "4242",
    "SLURM_NODELIST": "localhost",
}


@pytest.mark.slow
def test_slurm_sigusr1_saves_an_hpc_checkpoint_and_the_requeued_job_resumes_from_it(tmp_path):
    """Lightning's pre-emption path: SIGUSR1 saves hpc_ckpt_N.ckpt (then asks scontrol to requeue, which is
    absent here); the same command in the same run dir then continues from it instead of refusing the dir."""
    env = {**os.environ, **SLURM_ENV}
    args = [sys.executable, "-m", "visiontune.train", *SIGNAL_RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    interrupt_in_epoch_1(proc, signal.SIGUSR1)
    hpc = list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1 and ckpt(hpc[0])["epoch"] == 1
    fresh = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 2 and "holds checkpoints of an earlier run" in fresh.stderr  # a new job
    requeued = {**env, "SLURM_RESTART_COUNT": "1"}
    again = subprocess.run(args, cwd=ROOT, env=requeued, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "was requeued: resuming from" in again.stderr + again.stdout
