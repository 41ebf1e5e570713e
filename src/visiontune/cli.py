"""Shared helpers of the entry points (train, eval, preview, ...): config access, errors, the summary.

Every entry point runs its task through `run_cli`, so bad input ends the same way everywhere: one
line on stderr that says what is wrong and how to fix it, and exit code 2.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


def hydra_message(exc: Exception) -> str:
    """Hydra's message for bad command-line input (an unknown key or option, a malformed override) as
    one line; the private bases (`_base`, `_standard`) are not offered as options."""
    head, _, options = str(exc).partition("Available options")
    message = one_line(head)
    if options:
        title, _, names = options.partition(":")
        lines = names.strip("\n").splitlines()
        listed = [n.strip() for n in itertools.takewhile(lambda n: n.startswith("\t"), lines)]
        message += f" Available options{title}: " + ", ".join(n for n in listed if not n.startswith("_"))
    if isinstance(exc.__cause__, OmegaConfBaseException):
        message += f" ({one_line(str(exc.__cause__).splitlines()[0])})"
    return message


def one_line_hydra_errors() -> None:
    """Hydra reports the errors of its own, found before any task runs, in several lines with exit code
    1. Its reporter is wrapped (once, for every entry point that imports this module) so that these
    end like all bad input: one line on stderr, exit code 2. Hydra reports every other error as before."""
    from hydra._internal import utils
    from hydra.errors import ConfigCompositionException, OverrideParseException

    report = getattr(utils, "run_and_report", None)
    if report is None or getattr(report, "one_line", False):
        return

    def run_and_report(func):
        def checked():
            try:
                return func()
            except (OverrideParseException, ConfigCompositionException) as exc:
                fail(hydra_message(exc))

        return report(checked)

    run_and_report.one_line = True
    utils.run_and_report = run_and_report


one_line_hydra_errors()


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
