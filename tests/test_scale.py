"""Scale-out: 2-process CPU DDP, Hydra sweeps (basic and Optuna) with a summary, launcher configs."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import FAST, compose_cfg, run
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from visiontune.cli import CONF_DIR


def test_ddp_cpu_run_writes_one_metrics_json(tmp_path):
    result = run("visiontune.train", *FAST, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.rglob("metrics.json"))) == 1
    assert "test/acc" in json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").is_file()


def test_a_grid_sweep_writes_a_summary_of_every_run(tmp_path):
    """(An Optuna sweep through real training: test_sweeps.py.)"""
    result = run("visiontune.train", "-m", "optimizer=sgd,adamw", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("*/metrics.json"))) == 2
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert len(rows) == 2 and all(row["val/acc"] for row in rows)
    assert {r["overrides"].split()[0] for r in rows} == {"optimizer=sgd", "optimizer=adamw"}


@pytest.mark.parametrize("launcher", ["slurm", "local_parallel", "submitit_slurm", "joblib"])
def test_launcher_configs_compose(launcher):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert "_target_" in cfg.hydra.launcher
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 4 and "Slurm" in cfg.hydra.launcher._target_


def test_the_slurm_launcher_asks_for_sigusr1_before_the_time_limit_and_allows_requeue(tmp_path):
    """Lightning's SLURM pre-emption path needs SIGUSR1 ahead of the kill, and a requeueable job."""
    from submitit.slurm.slurm import _make_sbatch_string

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    extra = dict(cfg.hydra.launcher.additional_parameters)
    script = _make_sbatch_string(
        command="python -m visiontune.train", folder=str(tmp_path), additional_parameters=extra
    )
    assert "#SBATCH --signal=SIGUSR1@90" in script.splitlines()
    assert "#SBATCH --requeue" in script.splitlines()


@pytest.mark.parametrize("trainer", ["gpu", "ddp", "ddp_cpu", "fsdp", "multinode"])
def test_trainer_configs_are_trainer_arguments(trainer, tmp_path):
    import inspect

    import lightning as L

    cfg = compose_cfg([f"trainer={trainer}"], tmp_path)
    accepted = set(inspect.signature(L.Trainer).parameters)
    assert set(cfg.trainer) <= accepted, set(cfg.trainer) - accepted
