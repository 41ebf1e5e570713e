"""Hydra callback: during and after a multirun, one summary of every finished run's overrides and metrics.

Registered in conf/hydra/default.yaml. It writes the summary after every job as well as at the end,
so the runs that finished are summarised even when a later job ends the sweep (an error that exits,
a crash, a kill). Each file is replaced whole (written aside, then renamed), so the parallel jobs of
a launcher never leave a half-written one. In the sweep dir:
- summary.csv and summary.json: one row per run (with its Optuna trial and state in an Optuna sweep);
- summary_cv.csv and summary_cv.json, when runs differ only in `data.fold` (k-fold CV, e.g.
  `-m data.folds=5 data.fold=0,1,2,3,4`, or an Optuna sweep with `hydra.sweeper.cv_folds=5`): per
  group of folds, the mean and the sample standard deviation (n - 1) of each numeric metric.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import statistics
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from visiontune.sweeper.trial import read_record

log = logging.getLogger(__name__)
KEYS = ("val/acc", "test/acc", "test/loss", "train_time_s", "trainable_params", "frozen_params")
FOLD_KEY = "data.fold"


def run_overrides(run_dir: Path) -> list[str]:
    """The run's overrides without the sweeper's bookkeeping (`++optuna_trial.*`)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text()) if path.is_file() else []
    return [o for o in overrides or [] if not o.lstrip("+").startswith("optuna_trial.")]


def collect_runs(sweep_dir: Path) -> list[dict]:
    """One row per run dir with a metrics.json; `metrics` holds every metric for the CV summary."""
    rows = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: natural_key(p.parent.name)):
        run_dir = metrics_file.parent
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError):  # being written by a parallel job: the next summary has it
            continue
        row = {"run": run_dir.name, "overrides": " ".join(run_overrides(run_dir))}
        row.update({k: metrics.get(k) for k in KEYS})
        trial = read_record(run_dir)
        if trial:
            row.update(trial=trial.get("number"), state=trial.get("state"))
        rows.append({**row, "metrics": metrics})
    return rows


def natural_key(name: str) -> tuple:
    """Run dirs in numeric order: 2 before 10, 3_fold1 before 3_fold2."""
    head, _, tail = name.partition("_")
    return (int(head) if head.isdigit() else float("inf"), head, tail)


def cv_groups(rows: list[dict]) -> list[dict]:
    """Runs whose overrides differ only in data.fold, with mean and std of each numeric metric."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        overrides = row["overrides"].split()
        if not any(o.split("=")[0] == FOLD_KEY for o in overrides):
            continue
        key = " ".join(o for o in overrides if o.split("=")[0] != FOLD_KEY)
        groups.setdefault(key, []).append(row)
    summaries = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        numeric = [
            k
            for k, v in members[0]["metrics"].items()
            if all(is_number(m["metrics"].get(k)) for m in members) and is_number(v)
        ]
        numeric.sort(key=lambda k: (k not in KEYS, KEYS.index(k) if k in KEYS else 0, k))
        summary = {"overrides": key, "folds": len(members), "runs": " ".join(m["run"] for m in members)}
        for k in numeric:
            values = [float(m["metrics"][k]) for m in members]
            summary[f"{k}_mean"] = statistics.fmean(values)
            summary[f"{k}_std"] = statistics.stdev(values)
        summaries.append(summary)
    return summaries


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def write_rows(rows: list[dict], csv_path: Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    replace_text(csv_path, text.getvalue())
    replace_text(csv_path.with_suffix(".json"), json.dumps(rows, indent=2))


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole: into a file of this process beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_summary(sweep_dir: Path, report: bool = True) -> Path | None:
    """summary.csv/.json (and summary_cv.csv/.json) of the runs with a metrics.json; `report` logs the CV means."""
    rows = collect_runs(sweep_dir)
    if not rows:
        return None
    write_rows([{k: v for k, v in row.items() if k != "metrics"} for row in rows], sweep_dir / "summary.csv")
    cv = cv_groups(rows)
    if cv:
        write_rows(cv, sweep_dir / "summary_cv.csv")
        for group in cv if report else ():
            mean, std = group.get("val/acc_mean"), group.get("val/acc_std")
            if mean is not None:
                log.info("%d folds [%s]: val/acc %.4f +- %.4f", group["folds"], group["overrides"], mean, std)
    return sweep_dir / "summary.csv"


class SweepSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        """After each job of a multirun (in the job's process): the summary of the runs finished so far."""
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(Path(config.hydra.sweep.dir), report=False)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path:
            log.info("sweep summary: %s", path)
