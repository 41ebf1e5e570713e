"""Shared helpers of the entry points (train, eval, preview, ...): config access, errors, the summary.

Every entry point runs its task through `run_cli`, so bad input ends the same way everywhere: one
line on stderr that says what is wrong and how to fix it, and exit code 2.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

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
# what a command's required key (`???` in its conf/<command>.yaml) takes, for the line that asks for it
REQUIRED = {
    "ckpt_path": "<run dir>/checkpoints/best.ckpt",
    "inputs": "<image, folder, glob, list.txt or split:test>",
    "method": "int8|prune",
    "out": "<folder for the shards>",
}
# Where Hydra sets up a folder before any task runs: (module, function) -> (the folder's local name there,
# the calls that set it up: create it, open its log, write .hydra/)
HYDRA_DIR_SETUP = {
    ("hydra.core.utils", "run_job"): ("output_dir", ("mkdir", "configure_log", "_save_config")),
    ("hydra._internal.core_plugins.basic_sweeper", "sweep"): ("sweep_dir", ("mkdir",)),
    ("hydra._internal.core_plugins.basic_launcher", "launch"): ("sweep_dir", ("mkdir",)),
}
STARTED = time.time()  # what a run dir written before this process started cannot be newer than


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

    Before the task: the command's required keys are given, and its run dir (`paths.output_dir`) can be
    created. While it runs, every checkpoint it loads (to evaluate, serve, resume, distil from) has its
    stored settings checked by the command line's rules. Bad input leaves no run dir behind that this
    process made and filled with nothing but Hydra's records (`remove_unused_run_dirs`). A UserError
    may carry `details` (e.g. the list of bad files), printed after its line.
    """
    made = None
    try:
        check_checkpoint_settings_on_load()
        check_required(cfg.get("task_name") or task.__module__.rpartition(".")[2], cfg)
        check_dict_overrides(sys.argv[1:])
        made = make_output_dir(cfg)
        return task(cfg)
    except (UserError, MissingMandatoryValue) as exc:
        remove_unused_run_dirs(made)
        if isinstance(exc, MissingMandatoryValue):  # a required value that the checks did not name
            fail(f"config value {exc.full_key} is required: set {exc.full_key}=<value> on the command line")
        details = getattr(exc, "details", None)
        if details:
            print(f"error: {one_line(exc)}\n{details}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        fail(exc)
    except RunStopped as exc:
        print(f"stopped: {one_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)


def check_checkpoint_settings_on_load() -> None:
    """Have every checkpoint load check the settings it stores against the schema, as the command line's
    own values are (`config.check_checkpoint_settings`, called by `training.checkpoints.load_checkpoint`)."""
    from visiontune.config import check_checkpoint_settings
    from visiontune.training.checkpoints import SETTINGS_CHECKS

    if check_checkpoint_settings not in SETTINGS_CHECKS:
        SETTINGS_CHECKS.append(check_checkpoint_settings)


def check_required(command: str, cfg: DictConfig) -> None:
    """The command's required top-level keys (`???` in its YAML) are given, or one line asks for them."""
    missing = [k for k in cfg if isinstance(k, str) and OmegaConf.is_missing(cfg, k)]
    if missing:
        wanted = " ".join(f"{k}={REQUIRED.get(k, '<value>')}" for k in missing)
        raise UserError(f"{command} needs {wanted}")


def top_level_keys(text: str) -> list[str]:
    """The keys of a `{k: v, ...}` override value at its outer level (nested braces, lists and quotes skipped)."""
    keys, depth, quote, start = [], 0, None, 1
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == "," and depth == 1:
            start = i + 1
        elif char == ":" and depth == 1 and start is not None:
            keys.append(text[start:i].strip().strip("'\""))
            start = None
    return keys


def check_dict_overrides(argv: list[str]) -> None:
    """A dict given on the command line names each key once: Hydra would keep the last one silently."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if not value.startswith("{"):
            continue
        keys = top_level_keys(value)
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise UserError(f"{key.lstrip('+~')}: {', '.join(twice)} is given twice; each name once")


def make_output_dir(cfg: DictConfig) -> Path | None:
    """Create the run dir `paths.output_dir` before the task runs, or say in one line why it cannot be.

    Returns the topmost folder this created (None when it was there already), which bad input removes
    again while it holds no file.
    """
    try:
        path = OmegaConf.select(cfg, "paths.output_dir", default=None)
    except OmegaConfBaseException:  # outside a Hydra run: the command's checks report it
        return None
    if not path:
        return None
    run_dir = Path(str(path)).expanduser().absolute()
    made = next((p for p in (*reversed(run_dir.parents), run_dir) if not p.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_if_empty(made)  # the parents it made before it failed
        raise UserError(
            f"cannot create the run dir {run_dir} ({exc.strerror or exc}). "
            "Fix: paths.output_dir=<a writable folder> (or hydra.run.dir=...)"
        ) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"the run dir {run_dir} is not writable. Fix: paths.output_dir=<a writable folder>")
    return made


def remove_unused_run_dirs(made: Path | None) -> None:
    """After bad input: remove Hydra's run dir when it holds nothing but what this process's Hydra wrote
    into it (`.hydra/` and an empty log), and the folder `make_output_dir` made while it holds no file.

    A run dir that held anything else (an earlier run's checkpoints or logs, a resume) is never touched,
    nor is a sweep's job dir (the sweep records its failed trials there).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    single = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN
    hydra_dir = Path(HydraConfig.get().runtime.output_dir) if single else None
    if hydra_dir is not None and only_hydra_records(hydra_dir):
        close_logs_in(hydra_dir)
        shutil.rmtree(hydra_dir, ignore_errors=True)
    remove_if_empty(made)


def remove_if_empty(folder: Path | None) -> None:
    """Remove a folder this process made, unless a file has come into it since."""
    if folder is not None and folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def only_hydra_records(run_dir: Path) -> bool:
    """Whether run_dir holds only `.hydra/` (files this process wrote) and empty `*.log` files."""
    try:
        for entry in run_dir.iterdir():
            if entry.name == ".hydra" and entry.is_dir() and not entry.is_symlink():
                records = list(entry.iterdir())
                if not all(r.is_file() and r.stat().st_mtime >= STARTED - 2 for r in records):
                    return False
            elif not (entry.suffix == ".log" and entry.is_file() and entry.stat().st_size == 0):
                return False
    except OSError:
        return False
    return True


def close_logs_in(folder: Path) -> None:
    """Close and detach the logging file handlers (Hydra's job log) that write into `folder`."""
    for handler in list(logging.root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name and Path(name).parent == folder:
            logging.root.removeHandler(handler)
            handler.close()


def run_dir_problem(exc: BaseException) -> str | None:
    """The one line for Hydra failing to set up a run or sweep dir (create it, open its log, write
    `.hydra/`); None for any other error.

    Hydra does that before the task runs, in the functions and calls of `HYDRA_DIR_SETUP`; an error of
    the task (or of a callback) passes through those functions too, but from another call.
    """
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        setup = HYDRA_DIR_SETUP.get((frame.f_globals.get("__name__"), frame.f_code.co_name))
        if setup is not None:
            name, calls = setup
            if tb.tb_next is None or tb.tb_next.tb_frame.f_code.co_name not in calls:
                return None
            cause = next((e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError)), None)
            if cause is None:
                return None
            folder = Path(str(frame.f_locals.get(name) or cause.filename)).absolute()
            key = frame.f_locals.get("job_dir_key") or "hydra.sweep.dir"
            what = "run" if key == "hydra.run.dir" else "sweep"
            return f"cannot create the {what} dir {folder} ({cause.strerror or cause}). Fix: {key}=<a writable folder>"
        tb = tb.tb_next
    return None


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


# Hydra options that come from an optional package: when Hydra cannot find or load one, say how to get it
PLUGIN_OPTIONS = {
    "hydra/launcher/joblib": "the joblib launcher (hydra-joblib-launcher)",
    "hydra/launcher/submitit_slurm": "the SLURM launcher (hydra-submitit-launcher)",
    "hydra/launcher/submitit_local": "the submitit launcher (hydra-submitit-launcher)",
}


def plugin_advice(exc: Exception) -> str | None:
    """The one line for a launcher whose package is not installed (Hydra: "Could not load/find
    'hydra/launcher/joblib'"), None for any other error."""
    text = str(exc)
    for option, what in PLUGIN_OPTIONS.items():
        if f"Could not load '{option}'" in text or f"Could not find '{option}'" in text:
            return f"{what} is not installed: pip install 'visiontune[sweep]'"
    return None


def one_line_hydra_errors() -> None:
    """Hydra reports the errors of its own, found before any task runs, in several lines with exit code
    1. Its reporter is wrapped (once, for every entry point that imports this module) so that these
    end like all bad input: one line on stderr, exit code 2. So does a run dir that Hydra cannot create
    (`run_dir_problem`). Hydra reports every other error as before."""
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
                fail(plugin_advice(exc) or hydra_message(exc))
            except Exception as exc:
                problem = run_dir_problem(exc)
                if problem is None:
                    raise
                fail(problem)

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


# The loggers of what exports and quantizes ONNX models: their INFO lines report each graph pass (onnx_ir
# logs a line per initializer it deduplicates, most of the output of an export of Lite0)
ONNX_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnx", "onnx_ir", "onnxscript", "onnxruntime")


@contextlib.contextmanager
def quiet_libraries(names: Sequence[str] = ONNX_LOGGERS) -> Iterator[None]:
    """Inside the block, the records below ERROR of the `names` loggers (and their children), and every
    Python warning, go to the run's log file only (Hydra's `<run dir>/<command>.log`), not to the console.

    Without a log file they are dropped. Errors still reach the console, and nothing else changes: the
    loggers keep their levels, and whatever this program logs or prints itself is shown as before.
    "root" among `names` takes in the records logged on the root logger itself (`logging.warning(...)`).
    """
    names = tuple(names)
    files = [h for h in logging.root.handlers if isinstance(h, logging.FileHandler)]

    def console(record: logging.LogRecord) -> bool:
        quiet = any(record.name == n or record.name.startswith(n + ".") for n in names)
        return record.levelno >= logging.ERROR or not quiet

    def to_log_file(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        record = logging.LogRecord("py.warnings", logging.WARNING, filename, lineno, "%s", (text,), None)
        for handler in files:
            handler.handle(record)

    screens: list[logging.Handler] = []  # the handlers besides the log file that the records reach
    joined: list[tuple[logging.Logger, logging.Handler]] = []
    for name in names:
        logger = logging.getLogger(name)
        while True:
            screens += [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
            if not logger.propagate or logger.parent is None:
                break
            logger = logger.parent
        # a logger that keeps its records from root (Lightning's does) gets the log file for the block
        if logger is not logging.root:
            joined += [(logger, h) for h in files if h not in logger.handlers]
    screens, joined = list(dict.fromkeys(screens)), list(dict.fromkeys(joined))
    for handler in screens:
        handler.addFilter(console)
    for logger, handler in joined:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = to_log_file
            yield
    finally:
        for handler in screens:
            handler.removeFilter(console)
        for logger, handler in joined:
            logger.removeHandler(handler)
