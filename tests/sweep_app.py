"""A tiny Hydra app for the sweeper tests: `python tests/sweep_app.py -m [overrides]`.

Its "training" takes milliseconds: the metric is a fixed function of x, y and the fold, reported
epoch by epoch through `report_epoch`, the code path of the real pruning callback. It writes
metrics.json like visiontune.train, so the sweep summary reads it the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

import visiontune
from visiontune.sweeper.trial import TrialReporter, report_epoch

CONF = Path(visiontune.__file__).resolve().parent / "conf"
ConfigStore.instance().store(
    name="sweep_app",
    node={
        "defaults": [{"override hydra/sweeper": "optuna"}, "_self_"],
        "x": 0.5,
        "y": 1,
        "epochs": 3,
        "crash_if_x_below": None,  # a trial with x below this raises: a crashed trial
        "exit_if_x_above": None,  # a trial with x above this calls sys.exit(2), like an entry point's error
        "sleep_s": 0.0,  # per epoch: keeps two joblib workers busy at the same time
        "optimized_metric": "val/acc",
        "data": {"folds": None, "fold": None},
        "callbacks": {"checkpoint": {"monitor": "val/acc", "mode": "max"}},
        "paths": {"output_dir": "${hydra:runtime.output_dir}"},
        "hydra": {
            "searchpath": [f"file://{CONF}"],
            "sweep": {"dir": "sweep_app_runs", "subdir": "${hydra.job.num}"},
            "callbacks": {"sweep_summary": {"_target_": "visiontune.sweeper.summary.SweepSummary"}},
            "job_logging": {"root": {"level": "WARNING"}},
        },
    },
)


def score(cfg: DictConfig) -> float:
    """Best at x=0.3, y=1; each fold adds a known offset (0.01 * fold)."""
    return 1.0 - (cfg.x - 0.3) ** 2 - 0.1 * abs(cfg.y - 1) + 0.01 * (cfg.data.fold or 0)


def fake_trainer(epoch: int, value: float) -> SimpleNamespace:
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)
    return SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        callback_metrics={"val/acc": value},
        current_epoch=epoch,
        strategy=strategy,
        should_stop=False,
    )


@hydra.main(version_base="1.3", config_path=None, config_name="sweep_app")
def main(cfg: DictConfig) -> float:
    if cfg.crash_if_x_below is not None and cfg.x < cfg.crash_if_x_below:
        raise RuntimeError(f"x={cfg.x} crashes on purpose")
    if cfg.exit_if_x_above is not None and cfg.x > cfg.exit_if_x_above:
        print(f"error: x={cfg.x} exits on purpose", file=sys.stderr)
        sys.exit(2)
    final = score(cfg)
    reporter = TrialReporter.from_cfg(cfg)
    for epoch in range(cfg.epochs):
        time.sleep(cfg.sleep_s)
        value = final * (epoch + 1) / cfg.epochs  # a learning curve that ends at `final`
        trainer = fake_trainer(epoch, value)
        if reporter is not None and report_epoch(reporter, trainer, cfg.callbacks.checkpoint.monitor):
            break
    metrics = {"val/acc": value, "epochs": epoch + 1, "pid": os.getpid()}
    (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics))
    return value


if __name__ == "__main__":
    main()
