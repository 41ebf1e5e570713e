"""Hydra callback: after a multirun, one summary of every run's overrides and metrics.

Registered in conf/hydra/default.yaml; writes <sweep dir>/summary.csv (and summary.json).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)
KEYS = ("val/acc", "test/acc", "test/loss", "train_time_s", "trainable_params", "frozen_params")


def collect_runs(sweep_dir: Path) -> list[dict]:
    rows = []
    for metrics_file in sorted(
        sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)
    ):
        run_dir = metrics_file.parent
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        metrics = json.loads(metrics_file.read_text())
        rows.append(
            {"run": run_dir.name, "overrides": " ".join(overrides), **{k: metrics.get(k) for k in KEYS}}
        )
    return rows


def write_summary(sweep_dir: Path) -> Path | None:
    rows = collect_runs(sweep_dir)
    if not rows:
        return None
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    return sweep_dir / "summary.csv"


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path:
            log.info("sweep summary: %s", path)
