"""A signal to the whole process group (Ctrl-C, `timeout`, SLURM) while DataLoader workers run.

The workers get the signal too; they ignore it, and the main process stops at the end of its batch,
saves interrupted.ckpt and prints its resume line, exactly as without workers. The resumed run ends
with the weights of an uninterrupted one, random augmentation included (slow: three runs). The fast tests check the pieces: a worker
ignores both signals, a worker that dies while the run stops is part of the stop, and workers still
running at exit do not hold the exit up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, compose_cfg
from PIL import Image
from test_reliability import SIGNAL_RUN, STEPS, ckpt, signalled_run, train_process
from torch.utils.data import DataLoader, Dataset

from visiontune.cli import RunStopped
from visiontune.data.files import FileImageDataset
from visiontune.data.workers import ignore_interrupts
from visiontune.train import train

TRAIN_IMAGES = 128  # SIGNAL_RUN's STEPS an epoch


def noise_folder(root, train: int = TRAIN_IMAGES) -> None:
    """Two classes of 16 px noise images (blue and red tinted) in train/, val/ and test/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train // 2), ("val", 16), ("test", 16)):
        for label, name in enumerate(("blue", "red")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
                pixels[..., 2 * label] += 120
                Image.fromarray(pixels).save(folder / f"{i}.png")


def folder_run(root) -> list[str]:
    """SIGNAL_RUN (3 epochs, dropout, cosine schedule) on the image folder, decoded by one worker process,
    with random augmentation: each image's is seeded from (seed, epoch, index), so the resumed epoch draws
    the flips and rotations the uninterrupted one drew."""
    return [
        *SIGNAL_RUN,
        "data=imagefolder",
        f"data.root={root}",
        "data.train_subset=null",
        "data.num_workers=1",
        "augment=randaugment",
    ]


class WorkerPid(Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> int:
        return os.getpid()


def test_a_worker_ignores_sigterm_and_sigint_and_keeps_serving():
    loader = DataLoader(WorkerPid(), batch_size=1, num_workers=1, worker_init_fn=ignore_interrupts)
    batches = iter(loader)
    worker = int(next(batches))
    for name in ("TERM", "INT"):  # as a shell, a scheduler or a terminal sends them
        subprocess.run(["kill", f"-{name}", str(worker)], check=True)
    time.sleep(0.5)
    assert [int(next(batches)) for _ in range(4)] == [worker] * 4  # alive, and still serving
    del batches


STRAY = """
import sys
sys.path.insert(0, "tests")
from torch.utils.data import DataLoader
from test_reliability_signals import WorkerPid
from visiontune.data.workers import ignore_interrupts

loader = DataLoader(WorkerPid(), batch_size=1, num_workers=2, persistent_workers=True, worker_init_fn=ignore_interrupts)
held = iter(loader)  # never shut down: its workers are still running at exit
print(int(next(held)), flush=True)
"""


def test_workers_still_running_at_exit_do_not_hold_the_exit_up():
    """multiprocessing ends its children at exit with SIGTERM, which the workers ignore, then waits for them."""
    done = subprocess.run(
        [sys.executable, "-c", STRAY], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert not Path(f"/proc/{int(done.stdout)}").exists()  # the worker is gone too


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise_folder")
    noise_folder(root)
    return root


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    """The same run uninterrupted."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(compose_cfg(folder_run(images), run_dir))
    return run_dir


@pytest.mark.slow
def test_a_signal_to_the_process_group_with_workers_stops_cleanly_and_resume_is_exact(
    images, straight, tmp_path
):
    """SIGTERM (what `timeout`, SLURM and Kubernetes send) to the whole group; SIGINT to the run alone is
    test_reliability.py's, and the worker's own handling of both is checked above."""
    signum = signal.SIGTERM
    run = folder_run(images)
    cut = tmp_path / "cut"
    stop = signalled_run(signum, cut, *run)
    err = stop.stderr

    assert stop.returncode == 128 + signum, err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1, err[-3000:]
    assert f"interrupted by {signal.Signals(signum).name} in epoch 1" in stopped[0]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    resume_from = stopped[0].split("ckpt_path=")[1].strip()
    assert resume_from.endswith("interrupted.ckpt") and os.path.isfile(resume_from)
    assert not (cut / "checkpoints" / "on_exception.ckpt").exists()
    assert STEPS < ckpt(resume_from)["global_step"] < 2 * STEPS  # in epoch 1

    resumed = train_process(*run, f"ckpt_path={resume_from}", f"hydra.run.dir={cut}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = ckpt(straight / "checkpoints" / "last.ckpt"), ckpt(cut / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 3 * STEPS
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (straight, cut))
    assert first["test/loss"] == pytest.approx(second["test/loss"], abs=1e-6)


class DieWithTheSignal(L.Callback):
    """From batch 1 of epoch 1 on, the next image a worker reads sends SIGTERM to the main process and
    kills the worker: a worker that got the group's signal before it could ignore it."""

    def __init__(self, trigger):
        self.trigger = trigger

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            self.trigger.touch()


def test_a_worker_that_dies_while_the_run_stops_ends_in_the_stop_line_not_a_traceback(
    tmp_path, monkeypatch, caplog
):
    noise_folder(tmp_path / "images", train=64)  # 4 steps an epoch
    trigger, main_pid = tmp_path / "trigger", os.getpid()
    read = FileImageDataset.__getitem__

    def dying_read(self, i):
        if os.getpid() != main_pid and trigger.exists():
            os.kill(main_pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, i)

    monkeypatch.setattr(FileImageDataset, "__getitem__", dying_read)
    run = [*FAST, "data=imagefolder", f"data.root={tmp_path / 'images'}", "data.train_subset=null",
           "data.val_subset=null", "data.test_subset=null", "data.num_workers=1", "trainer.max_epochs=2"]  # fmt: skip
    with pytest.raises(RunStopped) as stop:
        train(compose_cfg(run, tmp_path / "run"), callbacks=[DieWithTheSignal(trigger)])

    line = str(stop.value)
    assert stop.value.exit_code == 128 + signal.SIGTERM and "interrupted by SIGTERM in epoch 1" in line
    # the state at the end of a batch, or (when the death broke into one) the last epoch end
    resume_from = line.split("ckpt_path=")[1]
    assert resume_from.endswith(("interrupted.ckpt", "last.ckpt")) and os.path.isfile(resume_from)
    assert ckpt(resume_from)["global_step"] >= 4  # epoch 0 is in it
    assert not (tmp_path / "run" / "checkpoints" / "on_exception.ckpt").exists()
    assert "training crashed" not in caplog.text
