"""The Lightning side of pruning: one callback around `trial.report_epoch`, and what train.py adds.

train.py does `callbacks += trial_callbacks(cfg)`: an empty list outside an Optuna trial.
"""

from __future__ import annotations

import lightning as L

from visiontune.sweeper.trial import TrialReporter, report_epoch


class OptunaPruning(L.Callback):
    """After each validation, report `monitor` to the Optuna trial; stop training when it is pruned.

    Stopping sets `trainer.should_stop` (no exception through Lightning): the run then tests and
    writes metrics.json as usual, and its optuna_trial.json says PRUNED.
    """

    def __init__(self, reporter: TrialReporter, monitor: str):
        self.reporter = reporter
        self.monitor = monitor

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report_epoch(self.reporter, trainer, self.monitor)


def trial_callbacks(cfg) -> list:
    """Lightning callbacks a sweep trial needs (pruning); none outside an Optuna sweep."""
    reporter = TrialReporter.from_cfg(cfg)
    if reporter is None:
        return []
    return [OptunaPruning(reporter, monitor=cfg.callbacks.checkpoint.monitor)]
