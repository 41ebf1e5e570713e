"""Hydra callback: after a multirun, one summary of every run's overrides and metrics.

Registered in conf/hydra/default.yaml; writes, in the sweep dir:
- summary.csv and summary.json: one row per run (with its Optuna trial and state in an Optuna sweep);
- summary_cv.csv and summary_cv.json, when runs differ only in `data.fold` (k-fold CV, e.g.
  `-m data.folds=5 data.fold=0,1,2,3,4`, or an Optuna sweep with `hydra.sweeper.cv_folds=5`): per
  group of folds, the mean and the sample standard deviation (n - 1) of each numeric metric.
"""

from __future__ import annotations

import csv
import json
import logging
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
        metrics = json.loads(metrics_file.read_text())
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
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    csv_path.with_suffix(".json").write_text(json.dumps(rows, indent=2))


def write_summary(sweep_dir: Path) -> Path | None:
    rows = collect_runs(sweep_dir)
    if not rows:
        return None
    write_rows([{k: v for k, v in row.items() if k != "metrics"} for row in rows], sweep_dir / "summary.csv")
    cv = cv_groups(rows)
    if cv:
        write_rows(cv, sweep_dir / "summary_cv.csv")
        for group in cv:
            mean, std = group.get("val/acc_mean"), group.get("val/acc_std")
            if mean is not None:
                log.info("%d folds [%s]: val/acc %.4f +- %.4f", group["folds"], group["overrides"], mean, std)
    return sweep_dir / "summary.csv"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path:
            log.info("sweep summary: %s", path)
