"""What a sweep checks before its first job: the packages it needs, and a launcher that can run here.

Both sweepers (`core.OptunaSweeper`, `grid.GridSweeper`) call these first, so a sweep that cannot
run ends with one line and exit code 2 before it writes a study or starts a job.
"""

from __future__ import annotations

import shutil

from omegaconf import DictConfig, OmegaConf

from visiontune.errors import UserError

INSTALL_SWEEP = "pip install 'visiontune[sweep]'"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def require_optuna():
    """The `optuna` module, or a one-line UserError that says how to install it."""
    try:
        import optuna
    except ImportError:
        raise UserError(
            f"the Optuna sweeper (hparams_search=optuna) needs Optuna, which is not installed: {INSTALL_SWEEP}"
        ) from None
    return optuna


def check_launcher(config: DictConfig) -> None:
    """The SLURM launcher submits with `srun`/`sbatch`: off a cluster, say so instead of submitit's RuntimeError."""
    target = OmegaConf.select(config, "hydra.launcher._target_", default=None)
    if target == SLURM_LAUNCHER and shutil.which("srun") is None:
        raise UserError(
            "hydra/launcher=slurm needs a SLURM cluster, and SLURM's srun was not found on this machine: "
            "run the command on the cluster's login node, or drop hydra/launcher for the default launcher "
            "(one job after the other) or use hydra/launcher=local_parallel (joblib, several at a time)"
        )
