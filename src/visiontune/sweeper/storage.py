"""Where a study lives (a database URL or a journal file), and the pruners by name.

A value with `://` is a SQLAlchemy URL (`sqlite:///study.db`, `postgresql://...`); anything else is
the path of an Optuna journal file, which works on a shared cluster file system where SQLite's
locking does not.
"""

from __future__ import annotations

from pathlib import Path

from visiontune.errors import UserError
from visiontune.sweeper.space import first_line

DEFAULT_JOURNAL = "optuna.journal"
PRUNERS = ("median", "hyperband", "none")


def resolve(spec: str | None, sweep_dir: Path) -> str:
    """The storage as every process of the sweep can open it: absolute paths, whatever their cwd.

    No storage means a journal file in the sweep dir (shared by the launcher's worker processes).
    """
    if not spec:
        return str((sweep_dir / DEFAULT_JOURNAL).resolve())
    spec = str(spec)
    if "://" not in spec:
        return str(Path(spec).expanduser().resolve())
    if spec in ("sqlite://", "sqlite:///:memory:"):
        raise UserError(
            f"storage '{spec}' is in memory, which worker processes cannot share: use sqlite:///study.db"
        )
    prefix = "sqlite:///"
    if spec.startswith(prefix) and not spec.startswith(prefix + "/"):
        return prefix + str(Path(spec[len(prefix) :]).resolve())
    return spec


def open_storage(spec: str):
    """An Optuna storage for a resolved `spec`; UserError (one line) when it cannot be opened."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        if "://" not in spec:
            if not Path(spec).parent.is_dir():
                raise UserError(f"cannot open the journal file '{spec}': its folder does not exist")
            return JournalStorage(JournalFileBackend(spec))
        # SQLite: wait for the file lock instead of failing when two workers write at once
        engine = {"connect_args": {"timeout": 60}} if spec.startswith("sqlite") else {"pool_pre_ping": True}
        return optuna.storages.RDBStorage(spec, engine_kwargs=engine)
    except UserError:
        raise
    except Exception as exc:  # SQLAlchemy, driver and OS errors all mean the same to the user
        raise UserError(
            f"cannot open the study storage '{spec}': {first_line(exc)} "
            "(give a database URL such as sqlite:///path/to/study.db, or a journal file path)"
        ) from None


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
