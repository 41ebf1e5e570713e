"""Where a study lives (a database URL or a journal file), its heartbeats, and the pruners by name.

A value with `://` is a SQLAlchemy URL (`sqlite:///study.db`, `postgresql://...`); anything else is
the path of an Optuna journal file, which works on a shared cluster file system where SQLite's
locking does not.

Heartbeats: the sweeper records one for each trial it runs, every `interval` seconds, from its own
process (`heartbeats`). A RUNNING trial whose last heartbeat is older than the grace period belonged
to a sweeper that was killed: `fail_stale` marks it FAIL, and Optuna's retry callback adds a WAITING
copy with the same parameters, which the next `ask` runs (at most `max_retry` times per trial).
`counted` says which trials fill `n_trials`. A database keeps them through Optuna's own heartbeat; a
journal file (the default), which Optuna gives none, keeps each trial's last heartbeat time in the
trial's system attributes (`JOURNAL_BEAT`), and `fail_stale` applies the same rule and the same retry
callback to it. The times come from each sweeper's clock: hosts sharing a journal need clocks that
agree to well within the grace period.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from visiontune.errors import UserError
from visiontune.sweeper.space import first_line

log = logging.getLogger(__name__)
DEFAULT_JOURNAL = "optuna.journal"
JOURNAL_BEAT = "visiontune:heartbeat"  # a journal trial's system attribute: the time of its last heartbeat
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class Heartbeat:
    """Seconds between a running trial's heartbeats, seconds without one before it is stale, retries."""

    interval: int
    grace_period: int | None = None  # None: Optuna's default, 2 * interval
    max_retry: int | None = None  # None: a killed trial is retried every time


def is_database(spec: str) -> bool:
    return "://" in spec


def resolve(spec: str | None, sweep_dir: Path) -> str:
    """The storage as every process of the sweep can open it: absolute paths, whatever their cwd.

    No storage means a journal file in the sweep dir (shared by the launcher's worker processes).
    """
    if not spec:
        return str((sweep_dir / DEFAULT_JOURNAL).resolve())
    spec = str(spec)
    if not is_database(spec):
        return str(Path(spec).expanduser().resolve())
    if spec in ("sqlite://", "sqlite:///:memory:"):
        raise UserError(
            f"storage '{spec}' is in memory, which worker processes cannot share: use sqlite:///study.db"
        )
    prefix = "sqlite:///"
    if spec.startswith(prefix) and not spec.startswith(prefix + "/"):
        return prefix + str(Path(spec[len(prefix) :]).resolve())
    return spec


def open_storage(spec: str, heartbeat: Heartbeat | None = None):
    """An Optuna storage for a resolved `spec`; UserError (one line) when it cannot be opened.

    `heartbeat`: Optuna's heartbeat for a database; ours for a journal file (`JOURNAL_BEAT`).
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        if not is_database(spec):
            if not Path(spec).parent.is_dir():
                raise UserError(f"cannot open the journal file '{spec}': its folder does not exist")
            journal = JournalStorage(JournalFileBackend(spec))
            journal.visiontune_heartbeat = heartbeat  # read by has_heartbeat, heartbeats and fail_stale
            return journal
        # SQLite: wait for the file lock instead of failing when two workers write at once
        engine = {"connect_args": {"timeout": 60}} if spec.startswith("sqlite") else {"pool_pre_ping": True}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(spec, engine_kwargs=engine, **heartbeat_arguments(heartbeat))
    except UserError:
        raise
    except Exception as exc:  # SQLAlchemy, driver and OS errors all mean the same to the user
        raise UserError(
            f"cannot open the study storage '{spec}': {first_line(exc)} "
            "(give a database URL such as sqlite:///path/to/study.db, or a journal file path)"
        ) from None


def heartbeat_arguments(heartbeat: Heartbeat | None) -> dict:
    """RDBStorage's heartbeat keywords, with Optuna's retry callback (under its Optuna >= 4.9 name when
    there is one)."""
    if heartbeat is None:
        return {}
    from optuna import storages

    new = hasattr(storages, "RetryHeartbeatStaleTrialCallback")
    retry = storages.RetryHeartbeatStaleTrialCallback if new else storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental (and, under the old name, deprecated)
        callback = retry(max_retry=heartbeat.max_retry)
    key = "heartbeat_stale_trial_callback" if new else "failed_trial_callback"
    return {"heartbeat_interval": heartbeat.interval, "grace_period": heartbeat.grace_period, key: callback}


def has_heartbeat(store) -> bool:
    """Whether `store` (as open_storage made it) records heartbeats."""
    return (
        getattr(store, "heartbeat_interval", None) is not None
        or getattr(store, "visiontune_heartbeat", None) is not None
    )


def fail_stale(study) -> list[tuple[int, int | None]]:
    """Mark FAIL the RUNNING trials whose heartbeat is too old (their sweeper was killed), through
    Optuna's `fail_stale_trials` (a database) or `fail_stale_journal_trials`, whose retry callback adds
    a WAITING copy of each one not retried `max_retry` times yet. Returns (stale trial, its retry or
    None) pairs."""
    import optuna

    running = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    if not running:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        journal = getattr(study._storage, "visiontune_heartbeat", None)
        if journal is not None:
            fail_stale_journal_trials(study, journal)
        else:
            optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retries = {
        t.system_attrs["retry_history"][-1]: t.number
        for t in trials
        if t.state == optuna.trial.TrialState.WAITING and t.system_attrs.get("retry_history")
    }
    failed = [t.number for t in trials if t.number in running and t.state == optuna.trial.TrialState.FAIL]
    return [(n, retries.get(n)) for n in failed]


def fail_stale_journal_trials(study, heartbeat: Heartbeat) -> None:
    """Optuna's `fail_stale_trials` for a journal: FAIL each RUNNING trial whose last heartbeat
    (`JOURNAL_BEAT`) is older than the grace period, then run the retry callback on it. A trial with no
    heartbeat at all (a sweeper that records none) is left alone."""
    import time

    import optuna

    grace = heartbeat.grace_period or 2 * heartbeat.interval
    store, now = study._storage, time.time()
    retry = heartbeat_arguments(heartbeat)
    callback = retry.get("heartbeat_stale_trial_callback") or retry.get("failed_trial_callback")
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        beat = trial.system_attrs.get(JOURNAL_BEAT)
        if beat is None or now - float(beat) <= grace:
            continue
        try:
            store.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except RuntimeError:  # finished meanwhile (another sweeper failed it first, or it just ended)
            continue
        callback(study, store.get_trial(trial._trial_id))


def record_heartbeat(store, trial_id: int) -> None:
    """One heartbeat of a running trial: Optuna's (a database) or `JOURNAL_BEAT` (a journal file)."""
    if getattr(store, "visiontune_heartbeat", None) is not None:
        import time

        store.set_trial_system_attr(trial_id, JOURNAL_BEAT, time.time())
    else:
        store.record_heartbeat(trial_id)


def counted(trials: list) -> list:
    """The trials that fill `n_trials`: every trial except WAITING ones (not started yet) and stale
    ones that were retried (their retry stands in for them). Failed, pruned and running ones count."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return [t for t in trials if t.state.name != "WAITING" and t.number not in retried]


@contextmanager
def heartbeats(store, trial_ids: list[int], interval: int) -> Iterator[None]:
    """Record a heartbeat for each trial now and every `interval` seconds until the block ends.

    From the sweeper's process, which outlives each job: when the sweeper is killed, its trials'
    heartbeats stop, and the next sweeper on the study fails and retries them.
    """
    if not has_heartbeat(store) or not trial_ids:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for trial_id in trial_ids:
                try:
                    record_heartbeat(store, trial_id)
                except Exception as exc:  # a locked or unreachable database: the next beat may pass
                    log.warning("optuna heartbeat not recorded: %s", first_line(exc))

    for trial_id in trial_ids:
        record_heartbeat(store, trial_id)
    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def make_pruner(name: str, startup_trials: int, min_epochs: int):
    """`median`, `hyperband` or `none`. Steps are epochs (1 = after the first epoch).

    `startup_trials`: the median pruner waits for that many complete trials; `min_epochs`: a trial
    trains at least that many epochs before it can be pruned.
    """
    from optuna.pruners import HyperbandPruner, MedianPruner, NopPruner

    if name == "median":
        return MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=min_epochs)
    if name == "hyperband":
        return HyperbandPruner(min_resource=max(1, min_epochs))
    if name == "none":
        return NopPruner()
    raise UserError(f"hydra.sweeper.pruner={name} is not a pruner: use one of {'|'.join(PRUNERS)}")
