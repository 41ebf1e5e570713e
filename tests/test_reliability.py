"""Reliability: no lost epochs, no false success, a clear line for every fault, exact resume after a signal."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import pytest
import torch
from helpers import FAST, CrashAt, compose_cfg, run, shared_run

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
    *FAST,
    "data.train_subset=128",
    "trainer.max_epochs=3",
    "scheduler=cosine",
    "model.head.dropout=0.3",
    "logger=csv",
]
STEPS = 128 // 16  # an epoch of SIGNAL_RUN
SIGNAL_AT = ("1", "2")  # the end of batch 2 of epoch 1 (tests/signal_run.py)


def signalled_run(signum: int, run_dir, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """visiontune-train `args` into run_dir, in a process group of its own that gets `signum` at the end of
    batch 2 of epoch 1 (tests/signal_run.py), as a shell, `timeout` or SLURM would send it."""
    return run("tests/signal_run.py", signal.Signals(signum).name, *SIGNAL_AT, *args,
               f"hydra.run.dir={run_dir}", env=env, new_session=True)  # fmt: skip


def train_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run("visiontune.train", *args, env=env)


@pytest.fixture(scope="session")
def signal_straight(tmp_path_factory):
    """SIGNAL_RUN uninterrupted."""
    return shared_run(
        tmp_path_factory, "signal_straight", lambda folder: train(compose_cfg(SIGNAL_RUN, folder))
    )


@pytest.mark.slow
def test_a_signal_saves_a_resumable_checkpoint_and_resume_is_exact(signal_straight, tmp_path):
    """SIGINT (Ctrl-C), data in memory: exit 130, one resume line, an exact resume. SIGTERM with loader
    workers is test_reliability_signals.py's."""
    straight, signum = signal_straight, signal.SIGINT
    cut = signalled_run(signum, tmp_path / "cut", *SIGNAL_RUN)
    assert cut.returncode == 128 + signum, cut.stderr[-2000:]
    proc_lines = [line for line in cut.stderr.splitlines() if line.startswith("stopped:")]
    assert len(proc_lines) == 1, cut.stderr[-2000:]
    assert f"interrupted by {signal.Signals(signum).name} in epoch 1" in proc_lines[0]
    assert "Traceback" not in cut.stderr and "weights_only" not in cut.stderr  # no alarming noise
    resume_from = proc_lines[0].split("ckpt_path=")[1].strip()
    assert resume_from.endswith("interrupted.ckpt") and os.path.isfile(resume_from)
    assert ckpt(resume_from)["epoch"] == 1 and STEPS < ckpt(resume_from)["global_step"] < 2 * STEPS

    resumed = train_process(*SIGNAL_RUN, f"ckpt_path={resume_from}", f"hydra.run.dir={tmp_path / 'cut'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = ckpt(straight / "checkpoints" / "last.ckpt"), ckpt(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 3 * STEPS
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key


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
    args = [*SIGNAL_RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    signalled_run(signal.SIGUSR1, tmp_path / "run", *SIGNAL_RUN, env=env)
    hpc = list((tmp_path / "run").glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1 and ckpt(hpc[0])["epoch"] == 1
    fresh = train_process(*args, env=env)
    assert fresh.returncode == 2 and "holds checkpoints of an earlier run" in fresh.stderr  # a new job
    requeued = {**env, "SLURM_RESTART_COUNT": "1"}
    again = train_process(*args, env=requeued)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "was requeued: resuming from" in again.stderr + again.stdout
