"""The rules of the data settings that the datamodule depends on, each written once.

Config validation (config.py) reads the choices from here (`BALANCE`, `CACHE_MODES`) and checks a
run's config before it starts; the datamodule calls these functions because code may build it
without that validation (a test, eval from a checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping

from visiontune.errors import UserError

BALANCE = ("none", "sampler", "loss_weights")
CACHE_MODES = ("none", "memory", "disk")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(key: str, value, allowed: str) -> str:
    return f"invalid config value data.{key}={value!r}: must be {allowed}"


def data_problem(data: Mapping) -> str | None:
    """The one-line message for the first bad `balance`, `cache`, `folds` or `fold` of a data config;
    None when they are fine. An absent key takes its default (no balancing, no cache, no folds)."""
    for key, choices in (("balance", BALANCE), ("cache", CACHE_MODES)):
        value = data.get(key, "none")
        if not (isinstance(value, str) and value in choices):
            return _invalid(key, value, "one of " + ", ".join(choices))
    folds, fold = data.get("folds"), data.get("fold")
    if folds is not None and not (_is_int(folds) and folds >= 2):
        return _invalid("folds", folds, "an integer >= 2")
    if fold is not None:
        below = folds if _is_int(folds) else None
        if not (_is_int(fold) and fold >= 0 and (below is None or fold < below)):
            allowed = f"in [0, {below}) (data.folds={below})" if below is not None else ">= 0"
            return _invalid("fold", fold, f"an integer {allowed}")
    return None


def check_data(data: Mapping) -> None:
    """Raise the UserError of `data_problem`, if any."""
    message = data_problem(data)
    if message:
        raise UserError(message)


def check_task_data(task: str, data: str, balance: str) -> None:
    """task=multilabel|multitask read their labels from a CSV; class balancing is for one class per image."""
    if data == "imagefolder":
        raise UserError(
            f"task={task} with data=imagefolder: image folders cannot express several labels per image. "
            "Use data=csv with lines of `path,labels` (labels separated by |, see task.label_sep), "
            "or a header `path,<label>,...` with 0/1 columns"
            + (", or one column per head" if task == "multitask" else "")
        )
    if data != "csv":
        raise UserError(
            f"task={task} with data={data}: its labels come from a CSV. Fix: data=csv data.root=<train.csv>"
        )
    if balance != "none":
        raise UserError(
            f"data.balance={balance} with task={task}: balancing is by one class per image. "
            "Fix: data.balance=none (task.pos_weight=true weighs rare labels)"
        )
