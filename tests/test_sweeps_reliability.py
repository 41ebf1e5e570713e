"""Sweeps that go wrong: a killed sweeper's trials, a bad job in a grid, a job that ends the sweep,
and a sweep whose plugin is missing or cannot run here.

Everything runs in this process: the sweeps through tests/sweep_app.py (milliseconds per job) or
visiontune.train's entry point, stopped by its checks before any training.
"""

from __future__ import annotations

import csv
import sys
import time
import warnings

import optuna
import pytest
from helpers import run_main
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from optuna.distributions import FloatDistribution
from sweep_app import main as app_main

from visiontune.sweeper.storage import (
    JOURNAL_BEAT,
    Heartbeat,
    counted,
    fail_stale,
    open_storage,
    record_heartbeat,
)
from visiontune.sweeper.trial import read_record
from visiontune.train import main as train_main

States = optuna.trial.TrialState
X = {"x": FloatDistribution(0.0, 1.0)}
INSTALL = "pip install 'visiontune[sweep]'"


@pytest.fixture
def app(monkeypatch):
    """tests/sweep_app.py's entry point, run in this process as `python tests/sweep_app.py` runs it: Hydra
    finds a script's config by its file (an imported module's by its package, which a test file has not)."""
    monkeypatch.setattr(app_main.__wrapped__, "__module__", "__main__")
    return lambda *args: run_main(app_main, *args)


def one_error_line(capsys) -> str:
    """The command's stderr, which must be one `error:` line; that line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def killed_trial(study, store):
    """A trial as a killed sweeper leaves it: RUNNING, with a last heartbeat that gets older and older."""
    with warnings.catch_warnings():  # Optuna: heartbeats are meant for study.optimize
        warnings.simplefilter("ignore", UserWarning)
        trial = study.ask(X)
    record_heartbeat(store, trial._trial_id)
    return trial


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_killed_sweepers_trial_is_failed_and_retried(kind, tmp_path, app):
    """Trial 1 was RUNNING when its sweeper died. The next sweeper on the study sees its heartbeat is
    older than grace_period, marks it FAIL and runs it again (trial 2, same x); with n_trials=2 the
    retry stands in for it, so no other trial is drawn. With max_retry=0 it stays FAIL and counts.
    The same with a database (Optuna's heartbeat) and a journal file (the default storage: ours)."""
    db = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else str(tmp_path / "optuna.journal")
    beat = Heartbeat(interval=1, grace_period=2, max_retry=0)
    store = open_storage(db, beat)
    study = optuna.create_study(storage=store, study_name="visiontune", direction="maximize")
    done = study.ask(X)
    study.tell(done, 0.5)
    killed = killed_trial(study, store)
    other = optuna.create_study(storage=store, study_name="no_retry", direction="maximize")
    killed_too = killed_trial(other, store)
    assert storage_counts(study) == 2  # before: the dead trial fills n_trials=2 for good
    time.sleep(3.2)  # past the 2 s grace period (the database's clock counts whole seconds)

    code = app(
        "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "x=interval(0,1)",
        f"hydra.sweeper.storage={db}", "hydra.sweeper.n_trials=2", "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=2", "hydra.sweeper.max_retry=1",
    )  # fmt: skip
    assert code == 0
    trials = optuna.load_study(study_name="visiontune", storage=open_storage(db)).get_trials()
    assert trials[1].system_attrs.get(JOURNAL_BEAT) is not None or kind == "sqlite"
    assert [t.state for t in trials] == [States.COMPLETE, States.FAIL, States.COMPLETE]
    retry = trials[2]
    assert retry.params == killed.params and retry.system_attrs["retry_history"] == [killed.number]
    assert read_record(tmp_path / "sweep" / "2")["state"] == "COMPLETE"
    assert storage_counts(study) == 2

    # max_retry=0: failed, not retried, and it counts toward n_trials
    assert fail_stale(other) == [(killed_too.number, None)]
    (failed,) = other.get_trials()
    assert failed.state == States.FAIL and len(counted(other.get_trials())) == 1


def storage_counts(study) -> int:
    return len(counted(study.get_trials(deepcopy=False)))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["hydra.sweeper.heartbeat_interval=0"], "hydra.sweeper.heartbeat_interval=0: give a whole number"),
        (["hydra.sweeper.max_retry=-1"], "hydra.sweeper.max_retry=-1: give a whole number >= 0"),
        (
            ["hydra.sweeper.heartbeat_interval=60", "hydra.sweeper.grace_period=30"],
            "grace_period=30 is not longer than heartbeat_interval=60",
        ),
    ],
)
def test_bad_heartbeat_settings_exit_2_with_one_line(tmp_path, capsys, app, setting, message):
    code = app("-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "x=interval(0,1)", *setting)
    assert code == 2 and message in one_error_line(capsys)
    assert not (tmp_path / "sweep").exists()


def test_a_bad_job_ends_a_grid_before_any_job_starts(tmp_path, capsys):
    """`-m data.folds=3 data.fold=0,5`: job 1 is refused by train's own config check before job 0 trains."""
    sweep = tmp_path / "sweep"
    code = run_main(train_main, "-m", "data.folds=3", "data.fold=0,5", f"hydra.sweep.dir={sweep}")
    line = one_error_line(capsys)
    assert code == 2
    assert line.startswith("error: job 1 of 2 (data.folds=3 data.fold=5): invalid config value data.fold=5")
    assert "No job was started" in line
    assert not sweep.exists()  # nothing written: not even multirun.yaml


@pytest.mark.parametrize(
    ("overrides", "code", "finished"),
    [
        (["x=0.2,0.9", "exit_if_x_above=0.7"], 2, ["0"]),  # job 1 exits (as an entry point's error does)
        (["x=0.1,0.5", "crash_if_x_below=0.3"], 1, ["1"]),  # job 0 crashes; Hydra runs job 1, then fails
    ],
)
def test_the_summary_holds_the_jobs_that_finished_before_the_sweep_fails(
    tmp_path, app, overrides, code, finished
):
    sweep = tmp_path / "sweep"
    assert app("-m", "hydra/sweeper=grid", f"hydra.sweep.dir={sweep}", *overrides) == code
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["run"] for r in rows] == finished and all(float(r["val/acc"]) > 0 for r in rows)


def test_optuna_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` fails as if it were not installed
    code = run_main(train_main, "-m", "hparams_search=optuna", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 2 and INSTALL in one_error_line(capsys)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("launcher", ["joblib", "local_parallel"])
def test_a_launcher_not_installed_is_one_line(tmp_path, capsys, monkeypatch, launcher):
    """Without hydra-joblib-launcher, Hydra has no hydra/launcher/joblib config (local_parallel is built on it)."""
    Plugins.instance()  # the plugins are scanned (and their configs stored) once per process: before removing
    monkeypatch.delitem(ConfigStore.instance().repo["hydra"]["launcher"], "joblib.yaml")
    code = run_main(train_main, "-m", f"hydra/launcher={launcher}", "seed=1,2", f"hydra.sweep.dir={tmp_path}")
    assert code == 2
    assert (
        one_error_line(capsys)
        == f"error: the joblib launcher (hydra-joblib-launcher) is not installed: {INSTALL}"
    )


@pytest.mark.parametrize("search", [[], ["hparams_search=optuna"]], ids=["grid", "optuna"])
def test_the_slurm_launcher_off_a_cluster_is_one_line(tmp_path, capsys, monkeypatch, search):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here, whatever this machine has
    sweep = tmp_path / "sweep"
    code = run_main(train_main, "-m", "hydra/launcher=slurm", "seed=1,2", *search, f"hydra.sweep.dir={sweep}")
    line = one_error_line(capsys)
    assert code == 2 and "SLURM's srun was not found" in line and "hydra/launcher=local_parallel" in line
    assert not sweep.exists()  # no study, no job
