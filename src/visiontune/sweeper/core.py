"""The Optuna sweeper: ask a batch of trials, launch their jobs through Hydra's launcher, tell the results.

How a study works:
- Identity: each job gets its trial as `++optuna_trial.{storage,study_name,number}` overrides
  (see `trial.py`) and the run dir `<sweep dir>/<trial number>` (`<number>_fold<i>` with CV).
- Sharing and resuming: the study lives in `storage` (a database URL or a journal file; by default
  `<sweep dir>/optuna.journal`). The sweeper asks only for `n_trials` minus the trials the study
  already has (`storage.counted`), so re-running a command continues its study, and several
  sweepers (a SLURM array) can share one study.
- Killed sweepers: the sweeper keeps a heartbeat for the trials it runs (a database or a journal); a
  RUNNING trial whose heartbeat stopped is failed and retried (`storage.fail_stale`, when the study
  is loaded and after every batch); the retry takes its place in `n_trials`.
- Outcome: a job that raises or exits is a FAIL trial (the study goes on); one whose run dir's
  `optuna_trial.json` says PRUNED is PRUNED; otherwise the task's return value completes it. With
  `cv_folds=K`, a trial is K jobs (`data.folds=K data.fold=i`) and Optuna gets the mean.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from visiontune.errors import UserError
from visiontune.sweeper import outputs, preflight, space, storage
from visiontune.sweeper.trial import read_record, record

log = logging.getLogger(__name__)


class TrialExit(Exception):
    """A job called sys.exit: its trial fails, the sweep goes on."""


class TrialTask:
    """The task function, with `SystemExit` turned into an exception Hydra records as a failed job.

    Without it, a job that exits (the entry points' error path) would end the whole sweep.
    """

    def __init__(self, task):
        self.task = task

    def __call__(self, cfg: DictConfig) -> Any:
        try:
            return self.task(cfg)
        except SystemExit as exc:
            raise TrialExit(f"the job exited with code {exc.code} (its error is on stderr)") from None


class OptunaSweeper(Sweeper):
    """Hydra sweeper over Optuna's ask/tell API; configured by conf/hydra/sweeper/optuna.yaml."""

    def __init__(
        self,
        study_name: str = "visiontune",
        storage: str | None = None,
        direction: str = "maximize",
        n_trials: int = 20,
        n_jobs: int | None = None,
        sampler: Any = None,
        pruner: str = "median",
        pruner_startup_trials: int = 5,
        pruner_min_epochs: int = 1,
        cv_folds: int | None = None,
        heartbeat_interval: int | None = 60,
        grace_period: int | None = 180,
        max_retry: int | None = 2,
        params: Any = None,
    ):
        self.study_name = str(study_name)
        self.storage = storage
        self.direction = str(direction)
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.pruner = str(pruner)
        self.pruner_spec = {
            "name": self.pruner if not cv_folds else "none",
            "startup_trials": int(pruner_startup_trials),
            "min_epochs": int(pruner_min_epochs),
        }
        self.cv_folds = cv_folds
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry
        self.params = dict(params or {})
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=TrialTask(task_function), config=config
        )

    def sweep(self, arguments: list[str]) -> list:
        """Run the study; bad input ends with one line on stderr and exit code 2."""
        try:
            return self.run_study(arguments)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    def run_study(self, arguments: list[str]) -> list:
        optuna = preflight.require_optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper logs its own one-liners
        self.check_settings()
        preflight.check_launcher(self.config)
        self.space, self.fixed = space.parse(self.params, arguments, self.config)
        self.check_space()
        self.sweep_dir = Path(self.config.hydra.sweep.dir)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        self.storage_spec = storage.resolve(self.storage, self.sweep_dir)
        self.store = storage.open_storage(self.storage_spec, self.heartbeat())
        study = self.load_study(self.store)

        returns = []
        while (remaining := self.n_trials - len(storage.counted(study.get_trials(deepcopy=False)))) > 0:
            trials = self.ask(study, min(remaining, self.trials_per_batch()))
            if trials:
                returns.append(self.run_batch(study, trials))
            self.fail_stale(study)
        outputs.write(study, self.sweep_dir, self.best_command)
        return returns

    # -- checks --------------------------------------------------------------------------------

    def check_settings(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise UserError(f"hydra.sweeper.direction={self.direction}: use maximize or minimize")
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise UserError(f"hydra.sweeper.n_trials={self.n_trials}: give a whole number >= 1")
        if self.pruner not in storage.PRUNERS:
            raise UserError(
                f"hydra.sweeper.pruner={self.pruner} is not a pruner: use {'|'.join(storage.PRUNERS)}"
            )
        if self.cv_folds is not None and (not isinstance(self.cv_folds, int) or self.cv_folds < 2):
            raise UserError(f"hydra.sweeper.cv_folds={self.cv_folds}: give K >= 2, or null for no CV")
        for key, allowed in (
            ("heartbeat_interval", "a whole number of seconds >= 1, or null for no heartbeats"),
            ("grace_period", "a whole number of seconds >= 1, or null for twice heartbeat_interval"),
            ("max_retry", "a whole number >= 0, or null to retry a killed trial every time"),
        ):
            value = getattr(self, key)
            low = 0 if key == "max_retry" else 1
            if value is not None and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= low
            ):
                raise UserError(f"hydra.sweeper.{key}={value}: give {allowed}")
        if self.heartbeat_interval and self.grace_period and self.grace_period <= self.heartbeat_interval:
            raise UserError(
                f"hydra.sweeper.grace_period={self.grace_period} is not longer than heartbeat_interval="
                f"{self.heartbeat_interval}: a live trial would look killed between two heartbeats; raise it"
            )
        mode = OmegaConf.select(self.config, "callbacks.checkpoint.mode", default=None)
        if (
            self.pruner != "none"
            and mode in ("max", "min")
            and (mode == "max") != (self.direction == "maximize")
        ):
            raise UserError(
                f"hydra.sweeper.direction={self.direction} but callbacks.checkpoint.mode={mode}: "
                "pruning compares the monitored metric in the study's direction; make them agree"
            )

    def check_space(self) -> None:
        if not self.space:
            raise UserError(
                "nothing to search: set hydra.sweeper.params or give a sweep override such as "
                "'optimizer.lr=tag(log, interval(1e-4, 1e-2))'"
            )
        if not self.cv_folds:
            return
        for key in ("data.folds", "data.fold"):
            if OmegaConf.select(self.config, key, default="absent") == "absent":
                raise UserError(
                    f"hydra.sweeper.cv_folds needs '{key}' in the config (the DataModule's K-fold split)"
                )
        given = [p.name for p in self.space] + [f.lstrip("+").split("=")[0] for f in self.fixed]
        if {"data.folds", "data.fold"} & set(given):
            raise UserError(
                "hydra.sweeper.cv_folds sets data.folds and data.fold for each job: drop them from the command line"
            )

    # -- the study -----------------------------------------------------------------------------

    def load_study(self, store):
        """Create the study, or load it to continue it (same study_name in the same storage)."""
        import optuna

        try:
            study = optuna.create_study(
                storage=store, study_name=self.study_name, direction=self.direction, load_if_exists=True
            )
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
            study = optuna.load_study(study_name=self.study_name, storage=store)
        if study.direction.name.lower() != self.direction:
            raise UserError(
                f"study '{self.study_name}' in {self.storage_spec} is {study.direction.name.lower()}d: "
                f"use hydra.sweeper.direction={study.direction.name.lower()} or another study_name"
            )
        self.check_space_matches(study)
        self.fail_stale(study)
        self.warn_running(study)
        done = len(study.get_trials(deepcopy=False))
        study.sampler = self.make_sampler(seed_offset=done + int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
        study.pruner = storage.make_pruner(**self.pruner_spec)
        where = f"{self.storage_spec}"
        if done:
            log.info(
                "optuna study '%s' (%s) has %d trials: continuing to %d",
                self.study_name,
                where,
                len(storage.counted(study.get_trials(deepcopy=False))),
                self.n_trials,
            )
        else:
            log.info("optuna study '%s' (%s): %d trials", self.study_name, where, self.n_trials)
        return study

    def heartbeat(self) -> storage.Heartbeat | None:
        if not self.heartbeat_interval:
            return None
        return storage.Heartbeat(self.heartbeat_interval, self.grace_period, self.max_retry)

    def fail_stale(self, study) -> None:
        """Fail (and retry) a killed sweeper's trials: RUNNING, with no heartbeat for the grace period."""
        if not storage.has_heartbeat(self.store):
            return
        for number, retry in storage.fail_stale(study):
            again = f"retried as trial {retry}" if retry is not None else "not retried (max_retry)"
            log.warning("optuna trial %d had no heartbeat (its sweeper was killed): FAIL, %s", number, again)

    def warn_running(self, study) -> None:
        """Without heartbeats, say so when the study holds RUNNING trials at the start: another live
        worker's, or a killed sweeper's, which stay RUNNING and count toward n_trials."""
        if storage.has_heartbeat(self.store):
            return
        running = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        if running:
            fix = "set hydra.sweeper.heartbeat_interval"
            log.warning(
                "optuna trials %s are RUNNING: another worker's, or a killed sweeper's, which stay RUNNING and "
                "count toward n_trials; to have killed trials failed and retried, %s", running, fix,
            )  # fmt: skip

    def check_space_matches(self, study) -> None:
        """A continued study keeps each parameter's kind, log scale and choices (Optuna refuses a change)."""
        from optuna.distributions import check_distribution_compatibility

        recorded = {}
        for trial in study.get_trials(deepcopy=False):
            recorded.update(trial.distributions)
        for p in self.space:
            if p.name not in recorded:
                continue
            try:
                check_distribution_compatibility(recorded[p.name], p.distribution)
            except ValueError as exc:
                raise UserError(
                    f"study '{self.study_name}' searched '{p.name}' as {recorded[p.name]}, not {p.distribution} "
                    f"({space.first_line(exc)}): keep its search space or use another hydra.sweeper.study_name"
                ) from None

    def make_sampler(self, seed_offset: int):
        """The configured sampler; its seed moves on by the trials already in the study.

        Otherwise a resumed study (or each worker of an array) would draw the same first points again.
        """
        import optuna
        from hydra.utils import instantiate

        if not self.sampler:
            return optuna.samplers.TPESampler()
        if isinstance(self.sampler, optuna.samplers.BaseSampler):  # built by Hydra (_recursive_: true)
            return self.sampler
        cfg = OmegaConf.create(OmegaConf.to_container(self.sampler, resolve=True))
        if cfg.get("seed") is not None:
            cfg.seed = int(cfg.seed) + seed_offset
        try:
            return instantiate(cfg)
        except Exception as exc:
            raise UserError(f"hydra.sweeper.sampler cannot be built: {space.first_line(exc)}") from None

    def trials_per_batch(self) -> int:
        """Trials launched together: hydra.sweeper.n_jobs, else the launcher's n_jobs, else 1 (jobs, not trials)."""
        n = self.n_jobs or OmegaConf.select(self.config, "hydra.launcher.n_jobs", default=None) or 1
        if n <= 0:  # joblib's -1: every CPU
            n = os.cpu_count() or 1
        return max(1, math.ceil(n / (self.cv_folds or 1)))

    def ask(self, study, k: int) -> list:
        """k trials (retries of killed trials first); one past n_trials (another worker asked at the same
        time) fails at once."""
        import optuna

        trials = []
        distributions = {p.name: p.distribution for p in self.space}
        for _ in range(k):
            with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for study.optimize
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask(fixed_distributions=distributions)
            if storage.has_heartbeat(self.store):  # at once: a sweeper killed before its batch starts
                storage.record_heartbeat(self.store, trial._trial_id)
            ahead = storage.counted(study.get_trials(deepcopy=False))
            if sum(t.number < trial.number for t in ahead) >= self.n_trials:
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.warning(
                    "optuna trial %d is past n_trials=%d (a parallel worker): not run",
                    trial.number,
                    self.n_trials,
                )
                continue
            trial.set_user_attr("pruner", self.pruner_spec)
            trials.append(trial)
        return trials

    # -- one batch -----------------------------------------------------------------------------

    def jobs(self, trial) -> list[tuple[str, list[str]]]:
        """(run subdir, overrides) of each job of a trial: one, or one per CV fold."""
        params = [p.override(trial.params[p.name]) for p in self.space]
        ident = [
            f"++optuna_trial.storage={quote(self.storage_spec)}",
            f"++optuna_trial.study_name={quote(self.study_name)}",
            f"++optuna_trial.number={trial.number}",
        ]
        n, k = trial.number, self.cv_folds
        if not k:
            return [(f"{n}", [*self.fixed, *params, *ident, f"hydra.sweep.subdir={n}"])]
        folds = []
        for i in range(k):
            split = [f"data.folds={k}", f"data.fold={i}", f"++optuna_trial.fold={i}"]
            folds.append(
                (f"{n}_fold{i}", [*self.fixed, *params, *split, *ident, f"hydra.sweep.subdir={n}_fold{i}"])
            )
        return folds

    def run_batch(self, study, trials: list):
        """Launch every job of `trials` in one launcher call, then tell Optuna each trial's outcome."""
        plan = [(trial, self.jobs(trial)) for trial in trials]
        batch, problems = [], {}
        for trial, jobs in plan:
            for _, overrides in jobs:
                try:  # compose here: a bad value fails its trial, not the launcher (and the sweep)
                    self.validate_batch_is_legal([overrides])
                except Exception as exc:
                    problems[trial.number] = f"its config does not compose: {space.first_line(exc)}"
            if trial.number not in problems:
                batch.extend(overrides for _, overrides in jobs)
        trial_ids = [trial._trial_id for trial in trials]
        with storage.heartbeats(self.store, trial_ids, self.heartbeat_interval or 0):
            results = self.launch(batch)
        returns = iter(results)
        for trial, jobs in plan:
            rets = [None] * len(jobs) if trial.number in problems else [next(returns) for _ in jobs]
            self.tell(study, trial, jobs, rets, problems.get(trial.number))
        return results

    def launch(self, batch: list[list[str]]) -> list:
        if not batch:
            return []
        try:
            results = list(self.launcher.launch(batch, initial_job_idx=self.job_idx))
        except Exception as exc:
            # e.g. a SLURM job killed for its time limit: the batch's trials fail, the study goes on
            log.error(
                "the launcher failed (%s): this batch's trials are recorded as FAIL", space.first_line(exc)
            )
            results = [None] * len(batch)
        self.job_idx += len(batch)
        return results

    def tell(self, study, trial, jobs: list, rets: list, problem: str | None) -> None:
        import optuna

        run_dirs = [
            run_dir(ret, self.sweep_dir / subdir) for (subdir, _), ret in zip(jobs, rets, strict=True)
        ]
        state, value, reason = outcome(rets, run_dirs, problem)
        already = self.store.get_trial(trial._trial_id).state
        if already.is_finished():  # failed as stale meanwhile: its heartbeats came too late
            log.warning(
                "optuna trial %d was marked %s while it ran (its heartbeat was late): its %s is not recorded; "
                "raise hydra.sweeper.grace_period", trial.number, already.name, state,
            )  # fmt: skip
            return
        study.tell(trial, value, state=getattr(optuna.trial.TrialState, state), skip_if_finished=True)
        if state == "PRUNED":  # Optuna keeps the last reported value
            value = next(
                (read_record(d).get("value") for d in run_dirs if read_record(d).get("value") is not None),
                None,
            )
        if reason:
            log.warning("optuna trial %d FAIL: %s", trial.number, reason)
        else:
            chosen = " ".join(p.override(trial.params[p.name]) for p in self.space)
            log.info("optuna trial %d %s: %s (%s)", trial.number, state, value, chosen)
        for d in run_dirs:
            record(d, study_name=self.study_name, number=trial.number, state=state, value=value,
                   params=trial.params, error=reason)  # fmt: skip

    def best_command(self, params: dict) -> tuple[list[str], str]:
        """(overrides, shell command) that train the given parameters once, without the sweep."""
        by_name = {p.name: p for p in self.space}
        keep = [
            f for f in self.fixed if not f.lstrip("+~").startswith(("hparams_search", "hydra.", "hydra/"))
        ]
        chosen = [by_name[k].override(v) if k in by_name else f"{k}={v}" for k, v in params.items()]
        overrides = [*keep, *chosen]
        return overrides, " ".join([*entry_command(), *map(shlex.quote, overrides)])


def outcome(rets: list, run_dirs: list[Path], problem: str | None) -> tuple[str, float | None, str | None]:
    """(state, value, reason for a failure) of one trial from its jobs' returns and run dirs."""
    if problem:
        return "FAIL", None, problem
    for ret in rets:
        if ret is None:
            return "FAIL", None, "the launcher did not return this job"
        if ret.status.name != "COMPLETED":
            return "FAIL", None, f"{type(ret._return_value).__name__}: {space.first_line(ret._return_value)}"
    if any(read_record(d).get("state") == "PRUNED" for d in run_dirs):
        return "PRUNED", None, None
    values = []
    for ret in rets:
        try:
            values.append(float(ret.return_value))
        except (TypeError, ValueError):
            return "FAIL", None, f"the job returned {ret.return_value!r}, not a number"
    if not all(math.isfinite(v) for v in values):
        return "FAIL", None, "the job returned nan: is optimized_metric a metric the run logs?"
    return "COMPLETE", sum(values) / len(values), None


def run_dir(ret, default: Path) -> Path:
    if ret is not None and ret.hydra_cfg is not None:
        return Path(ret.hydra_cfg.hydra.runtime.output_dir)
    return default


def quote(value: str) -> str:
    """A Hydra override value that is read back as exactly this string."""
    value = str(value)
    return f'"{value}"' if "'" in value else f"'{value}'"


def entry_command() -> list[str]:
    """How this app was started: `python -m module`, or `python script.py`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
