"""The trial side of a sweep: per-epoch reports to Optuna, pruning, and the run dir's record.

The sweeper names each job's trial with overrides: `++optuna_trial.storage=...`,
`++optuna_trial.study_name=...`, `++optuna_trial.number=N` (and `++optuna_trial.fold=i` for one
fold of a cross-validated trial). The pruner settings travel as the trial's user attribute
`pruner`, so the sweeper and every job build the same pruner. Steps are epochs, counted from 1.

A pruned job stops training (it does not raise), writes `optuna_trial.json` with state PRUNED in
its run dir, and returns as usual; the sweeper then tells Optuna the trial was PRUNED.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
TRIAL_FILE = "optuna_trial.json"


class TrialReporter:
    """Reports one job's per-epoch metric to its Optuna trial and says when to stop."""

    def __init__(self, storage: str, study_name: str, number: int, run_dir: Path):
        self.storage, self.study_name, self.number, self.run_dir = storage, study_name, number, run_dir
        self._trial: Any = None
        self._loaded = False
        self._last_step: int | None = None

    @classmethod
    def from_cfg(cls, cfg, run_dir: Path | None = None) -> TrialReporter | None:
        """None outside an Optuna trial, and for CV folds (K folds cannot share one trial's steps)."""
        info = cfg.get("optuna_trial")
        if not info or info.get("fold") is not None:
            return None
        run_dir = Path(run_dir if run_dir is not None else cfg.paths.output_dir)
        return cls(str(info.storage), str(info.study_name), int(info.number), run_dir)

    def report(self, step: int, value: float) -> bool:
        """Report `value` after epoch `step`; True (and the run dir marked PRUNED) when Optuna prunes."""
        if step == self._last_step:  # several validations in one epoch: the first one counts
            return False
        self._last_step = step
        trial = self._load()
        if trial is None:
            return False
        import optuna

        try:
            trial.report(float(value), step)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale: its sweeper was killed
            log.warning("optuna trial %d was finished meanwhile: not reporting to it", self.number)
            self._trial = None
            return False
        if not trial.should_prune():
            return False
        record(self.run_dir, state="PRUNED", number=self.number, step=step, value=float(value))
        log.info("optuna trial %d pruned after epoch %d (%.4g)", self.number, step, value)
        return True

    def _load(self):
        """The live trial, or None (with a warning) when it is already finished: a re-run of its overrides."""
        if self._loaded:
            return self._trial
        self._loaded = True
        import optuna

        from visiontune.sweeper.storage import make_pruner, open_storage

        storage = open_storage(self.storage)
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        frozen = storage.get_trial(trial_id)
        if frozen.state != optuna.trial.TrialState.RUNNING:
            log.warning("optuna trial %d is %s already: not reporting to it", self.number, frozen.state.name)
            return None
        pruner = make_pruner(
            **frozen.user_attrs.get("pruner", {"name": "none", "startup_trials": 0, "min_epochs": 1})
        )
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=pruner,
        )
        self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial


def report_epoch(reporter: TrialReporter, trainer, monitor: str) -> bool:
    """After a validation: report `monitor` (rank 0), stop every rank when pruned. True when pruned.

    Only `trainer.sanity_checking`, `is_global_zero`, `callback_metrics`, `current_epoch`,
    `strategy.broadcast` and `should_stop` are used, so tests can pass a stand-in trainer.
    """
    if trainer.sanity_checking:
        return False
    prune = False
    if trainer.is_global_zero:
        value = trainer.callback_metrics.get(monitor)
        if value is not None:
            prune = reporter.report(trainer.current_epoch + 1, float(value))
    prune = bool(trainer.strategy.broadcast(prune, src=0))
    if prune:
        trainer.should_stop = True
    return prune


def record(run_dir: Path, **fields) -> None:
    """Merge `fields` into the run dir's optuna_trial.json (non-finite numbers become null)."""
    path = Path(run_dir) / TRIAL_FILE
    data = read_record(run_dir)
    data.update(
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def read_record(run_dir: Path) -> dict:
    path = Path(run_dir) / TRIAL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
