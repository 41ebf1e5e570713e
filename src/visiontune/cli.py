"""Shared helpers of the entry points (train, eval, preview, ...): config access, errors, the summary.

Every entry point runs its task through `run_cli`, so bad input ends the same way everywhere: one
line on stderr that says what is wrong and how to fix it, and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from visiontune.errors import UserError, one_line

# The configs ship inside the package, so an installed wheel finds them from any directory.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
EXIT_USER_ERROR = 2
SUMMARY_KEYS = (
    "val/acc",
    "test/acc",
    "test/loss",
    "train_time_s",
    "images_per_s",
    "trainable_params",
    "frozen_params",
)


def plain(node) -> dict:
    """An OmegaConf node as plain Python containers (what checkpoints may hold)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def data_patch(cfg: DictConfig) -> dict:
    """The data keys given on the command line (`data.<key>=value`), with their values from cfg.data.

    The commands after training patch the checkpoint's stored data config with these only (the rest
    comes from the checkpoint). Empty outside a Hydra run.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    keys = []
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("data."):
            keys.append(key[len("data.") :].split(".", 1)[0])
    return {k: plain_value(cfg.data[k]) for k in dict.fromkeys(keys) if k in cfg.data}


def plain_value(value):
    """An OmegaConf node as plain Python containers; any other value as it is."""
    return plain(value) if isinstance(value, DictConfig | ListConfig) else value


def fail(message: object) -> None:
    """Print `error: <message>` as one line on stderr and exit with code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


class RunStopped(Exception):
    """A run that ended early on purpose (a signal): one line on stderr, and this exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(task, cfg: DictConfig):
    """Run `task(cfg)`; bad input ends with one line on stderr and exit code 2, not a traceback.

    A UserError may carry `details` (e.g. the list of bad files), printed after its line.
    """
    try:
        return task(cfg)
    except UserError as exc:
        details = getattr(exc, "details", None)
        if details:
            print(f"error: {one_line(exc)}\n{details}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        fail(exc)
    except RunStopped as exc:
        print(f"stopped: {one_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)


def print_summary(metrics: dict, run_dir: Path, keys: tuple[str, ...] = SUMMARY_KEYS) -> None:
    """The run's headline figures as a table (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"visiontune run: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in keys:
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) and value < 10 else f"{value:,}")
    Console().print(table)
