"""Optuna sweeps: shared and resumed studies, pruning, failed trials, k-fold CV, end-of-study files.

Most tests drive the sweeper through tests/sweep_app.py, a Hydra app whose "training" takes
milliseconds; one slow test goes through `python -m visiontune.train -m hparams_search=optuna`.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from helpers import MODEL, run
from omegaconf import OmegaConf

from visiontune.sweeper import space
from visiontune.sweeper.storage import open_storage
from visiontune.sweeper.trial import read_record

HERE = Path(__file__).resolve().parent
APP = HERE / "sweep_app.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
States = optuna.trial.TrialState


def sweep(
    tmp_path: Path,
    *overrides: str,
    sweep_dir: str = "sweep",
    app: list[str] | None = None,
    fresh: bool = False,
):
    """Run a multirun of the tiny app (or `app`) in tmp_path; the sweep dir is tmp_path/sweep_dir.

    `fresh`: in a new interpreter, as the shell starts it, not in a fork of this worker. For a launcher
    whose jobs run in processes of their own (joblib's loky workers, submitit's): they unpickle the
    Hydra state the sweeper sends them, and a fork's holds the config schemas this worker has imported
    (visiontune.config): each job process would import torch and Lightning to read it back, some
    20 CPU-seconds a sweep. The tiny app imports neither, in the sweeper or in its jobs.
    """
    app = app or [str(APP)]
    script, *args = app[1:] if app[0] == "-m" else app  # a module (`-m name`) or a script
    args = [*args, "-m", f"hydra.sweep.dir={tmp_path / sweep_dir}", *overrides]
    if fresh:
        command = [sys.executable, *(["-m", script] if app[0] == "-m" else [script]), *args]
        return subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    return run(script, *args, cwd=tmp_path, env=ENV)


def load_trials(storage: str, study_name: str = "visiontune") -> list:
    return optuna.load_study(study_name=study_name, storage=open_storage(storage)).get_trials()


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_parallel_workers_share_one_study(tmp_path):
    journal = tmp_path / "study.journal"
    result = sweep(
        tmp_path, "x=interval(0,1)", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_trials=6", f"hydra.sweeper.storage={journal}", "sleep_s=0.3", fresh=True,
    )  # fmt: skip
    ok(result)
    trials = load_trials(str(journal))
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == States.COMPLETE for t in trials), [t.state for t in trials]
    assert len({t.params["x"] for t in trials}) == 6
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 6
    assert len({json.loads(p.read_text())["pid"] for p in runs}) == 2  # two worker processes


def test_submitit_launcher_runs_the_trials(tmp_path):
    """submitit (here its local executor, as on SLURM) pickles the task and returns each job's result."""
    result = sweep(
        tmp_path, "x=interval(0,1)", "hydra/launcher=submitit_local", "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2", "crash_if_x_below=0.3", fresh=True,
    )  # fmt: skip
    ok(result)
    trials = load_trials(str(tmp_path / "sweep" / "optuna.journal"))
    assert len(trials) == 2
    assert all(t.state == (States.FAIL if t.params["x"] < 0.3 else States.COMPLETE) for t in trials)
    assert all(read_record(tmp_path / "sweep" / str(t.number))["state"] == t.state.name for t in trials)


def test_trial_worse_than_the_median_is_pruned(tmp_path):
    """Two trials at the optimum complete; a third, worse at its first epoch, stops there as PRUNED."""
    common = [
        "hydra.sweeper.pruner=median",
        "hydra.sweeper.pruner_startup_trials=2",
        "hydra.sweeper.pruner_min_epochs=1",
    ]
    ok(sweep(tmp_path, "x=interval(0.3,0.3)", "hydra.sweeper.n_trials=2", *common))
    result = sweep(tmp_path, "x=interval(0.9,0.9)", "hydra.sweeper.n_trials=3", *common)
    ok(result)
    trials = load_trials(str(tmp_path / "sweep" / "optuna.journal"))
    assert [t.state for t in trials] == [States.COMPLETE, States.COMPLETE, States.PRUNED]
    assert list(trials[2].intermediate_values) == [1]  # reported after epoch 1, then stopped
    run = tmp_path / "sweep" / "2"
    assert read_record(run)["state"] == "PRUNED"
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "sweep" / "summary.csv"))}
    assert rows["2"]["state"] == "PRUNED" and rows["0"]["state"] == "COMPLETE"


def test_pruner_none_lets_every_trial_finish(tmp_path):
    common = ["hydra.sweeper.pruner=none", "hydra.sweeper.pruner_startup_trials=2"]
    ok(sweep(tmp_path, "x=interval(0.3,0.3)", "hydra.sweeper.n_trials=2", *common))
    ok(sweep(tmp_path, "x=interval(0.9,0.9)", "hydra.sweeper.n_trials=3", *common))
    trials = load_trials(str(tmp_path / "sweep" / "optuna.journal"))
    assert [t.state for t in trials] == [States.COMPLETE] * 3
    assert list(trials[2].intermediate_values) == [1, 2, 3]


def test_rerun_continues_the_study_up_to_n_trials(tmp_path):
    db = "sqlite:///study.db"  # relative: the sweeper makes it absolute for every job
    first = ["x=interval(0,1)", f"hydra.sweeper.storage={db}", "hydra.sweeper.study_name=resume"]
    ok(sweep(tmp_path, *first, "hydra.sweeper.n_trials=4", sweep_dir="first"))
    before = load_trials(f"sqlite:///{tmp_path}/study.db", "resume")
    ok(sweep(tmp_path, *first, "hydra.sweeper.n_trials=6", sweep_dir="second"))
    after = load_trials(f"sqlite:///{tmp_path}/study.db", "resume")
    assert len(before) == 4 and len(after) == 6
    assert [t.number for t in after] == list(range(6))
    assert sorted(p.parent.name for p in (tmp_path / "second").glob("*/metrics.json")) == ["4", "5"]
    # the sampler's seed moved on: the new trials do not repeat the first ones
    assert not {t.params["x"] for t in after[4:]} & {t.params["x"] for t in before}
    ok(sweep(tmp_path, *first, "hydra.sweeper.n_trials=6", sweep_dir="third"))
    assert len(load_trials(f"sqlite:///{tmp_path}/study.db", "resume")) == 6
    assert not list((tmp_path / "third").glob("*/metrics.json"))


def test_crashed_and_exited_trials_fail_and_the_study_goes_on(tmp_path):
    result = sweep(
        tmp_path, "x=interval(0,1)", "hydra.sweeper.n_trials=4", "crash_if_x_below=0.3", "exit_if_x_above=0.7"
    )
    ok(result)
    trials = load_trials(str(tmp_path / "sweep" / "optuna.journal"))
    assert len(trials) == 4
    for t in trials:
        bad = t.params["x"] < 0.3 or t.params["x"] > 0.7
        assert t.state == (States.FAIL if bad else States.COMPLETE), (t.number, t.params)
        assert read_record(tmp_path / "sweep" / str(t.number))["state"] == t.state.name
    # the seed draws one of each kind: a raise and a sys.exit both fail only their own trial
    assert any(t.params["x"] < 0.3 for t in trials) and any(t.params["x"] > 0.7 for t in trials)
    errors = {
        read_record(tmp_path / "sweep" / str(t.number))["error"] for t in trials if t.state == States.FAIL
    }
    assert any("RuntimeError" in e for e in errors) and any("exited with code 2" in e for e in errors)


def test_cv_grid_summary_is_the_mean_and_std_of_the_folds(tmp_path):
    ok(sweep(tmp_path, "hydra/sweeper=basic", "data.folds=3", "data.fold=0,1,2", "y=1,2"))
    runs = {r["run"]: r for r in csv.DictReader(open(tmp_path / "sweep" / "summary.csv"))}
    cv = {r["overrides"]: r for r in csv.DictReader(open(tmp_path / "sweep" / "summary_cv.csv"))}
    assert set(cv) == {"data.folds=3 y=1", "data.folds=3 y=2"}
    for group in cv.values():
        members = [runs[name] for name in group["runs"].split()]
        assert len(members) == int(group["folds"]) == 3
        assert {m["overrides"].replace(" data.fold=", "|").split("|")[1][0] for m in members} == {
            "0",
            "1",
            "2",
        }
        values = [float(m["val/acc"]) for m in members]
        assert float(group["val/acc_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(group["val/acc_std"]) == pytest.approx(statistics.stdev(values))
    # the app's score at x=0.5: 1 - 0.2**2 - 0.1 * |y - 1| + 0.01 * fold; folds 0, 1, 2 add 0.01 on average
    assert float(cv["data.folds=3 y=2"]["val/acc_mean"]) == pytest.approx(1 - 0.04 - 0.1 + 0.01)


def test_optuna_cv_trial_tells_the_mean_of_its_folds(tmp_path):
    ok(sweep(tmp_path, "x=interval(0,1)", "hydra.sweeper.cv_folds=3", "hydra.sweeper.n_trials=2"))
    trials = load_trials(str(tmp_path / "sweep" / "optuna.journal"))
    assert [t.state for t in trials] == [States.COMPLETE] * 2
    for t in trials:
        folds = [tmp_path / "sweep" / f"{t.number}_fold{i}" for i in range(3)]
        values = [json.loads((d / "metrics.json").read_text())["val/acc"] for d in folds]
        assert t.value == pytest.approx(statistics.fmean(values))
        for i, d in enumerate(folds):
            overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
            assert "data.folds=3" in overrides and f"data.fold={i}" in overrides
    cv = list(csv.DictReader(open(tmp_path / "sweep" / "summary_cv.csv")))
    assert sorted(float(r["val/acc_mean"]) for r in cv) == pytest.approx(sorted(t.value for t in trials))


def test_end_of_study_writes_plots_and_a_best_yaml_that_reruns_the_best(tmp_path):
    ok(sweep(tmp_path, "x=interval(0,1)", "y=choice(1,2)", "epochs=2", "hydra.sweeper.n_trials=4"))
    out = tmp_path / "sweep"
    for name in ("optimization_history.png", "param_importances.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    best = yaml.safe_load((out / "best.yaml").read_text())
    trials = load_trials(str(out / "optuna.journal"))
    top = max((t for t in trials if t.state == States.COMPLETE), key=lambda t: t.value)
    assert best["trial"] == top.number and best["params"] == top.params
    assert "epochs=2" in best["overrides"]
    # the command line in best.yaml trains the best trial again, as a single run
    args = shlex.split(best["command"])[1:]
    rerun = run(*args, f"hydra.run.dir={tmp_path / 'rerun'}", cwd=tmp_path, env=ENV)
    ok(rerun)
    assert json.loads((tmp_path / "rerun" / "metrics.json").read_text())["val/acc"] == pytest.approx(
        top.value
    )


def test_one_complete_trial_skips_param_importances_with_a_warning(tmp_path):
    result = sweep(tmp_path, "x=interval(0,1)", "hydra.sweeper.n_trials=1")
    ok(result)
    assert "param_importances.png skipped" in result.stdout + result.stderr
    assert (tmp_path / "sweep" / "optimization_history.png").is_file()
    assert not (tmp_path / "sweep" / "param_importances.png").exists()
    assert (tmp_path / "sweep" / "best.yaml").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["x=interval(0,1)", "hydra.sweeper.storage=nosuchdb://host/x"], "cannot open the study storage"),
        (
            ["x=interval(0,1)", "hydra.sweeper.storage=sqlite:////no/such/dir/s.db"],
            "cannot open the study storage",
        ),
        (["x=interval(0,1)", "hydra.sweeper.storage=/no/such/dir/s.journal"], "cannot open the journal file"),
        (["nope=interval(0,1)"], "search space key 'nope' is not in the config"),
        (["x=tag(log,interval(0,1))"], "x=tag(log,interval(0,1))"),
        (["x=interval(0,1)", "hydra.sweeper.pruner=average"], "is not a pruner"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, overrides, message):
    result = sweep(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_continuing_a_study_with_other_choices_exits_2(tmp_path):
    ok(sweep(tmp_path, "x=choice(0.3,0.4)", "hydra.sweeper.n_trials=1"))
    result = sweep(tmp_path, "x=choice(0.3,0.9)", "hydra.sweeper.n_trials=2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "use another hydra.sweeper.study_name" in result.stderr
    assert len(load_trials(str(tmp_path / "sweep" / "optuna.journal"))) == 1


def test_search_space_grammar_becomes_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    cfg = OmegaConf.create(
        {"a": 1.0, "b": 1, "c": 0.0, "d": 1, "e": 0.1, "f": "x", "hydra": {"runtime": {"choices": {}}}}
    )
    params = {
        "a": "tag(log, interval(1e-4, 3e-3))",
        "b": "range(1, 5)",
        "c": "choice(0.0, 0.2, 0.4)",
        "f": "p,q",
    }
    found, fixed = space.parse(
        params, ["d=tag(log, int(interval(1, 64)))", "e=range(0.1, 0.5, 0.1)", "c=0.2"], cfg
    )
    by_name = {p.name: p for p in found}
    assert fixed == ["c=0.2"]  # the command line fixes a parameter that params would search
    assert by_name["a"].distribution == FloatDistribution(1e-4, 3e-3, log=True)
    assert by_name["b"].distribution == IntDistribution(1, 4)  # range() excludes its stop, like Python's
    assert by_name["d"].distribution == IntDistribution(1, 64, log=True)
    assert by_name["e"].distribution == FloatDistribution(0.1, 0.4, step=0.1)
    assert by_name["f"].distribution == CategoricalDistribution(["p", "q"])
    assert by_name["a"].override(0.00123) == "a=0.00123" and by_name["f"].override("q") == "f=q"


def test_trial_callbacks_prune_a_lightning_run(tmp_path):
    """The callback train.py adds: nothing outside a sweep; inside, it stops a trial worse than the median."""
    from visiontune.sweeper.pruning import trial_callbacks

    journal = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(journal), direction="maximize")
    for _ in range(2):
        done = study.ask()
        done.report(0.9, 1)
        study.tell(done, 0.9)
    trial = study.ask()
    trial.set_user_attr("pruner", {"name": "median", "startup_trials": 2, "min_epochs": 1})
    base = {
        "callbacks": {"checkpoint": {"monitor": "val/acc"}},
        "paths": {"output_dir": str(tmp_path / "run")},
    }
    ident = {"storage": journal, "study_name": "s", "number": trial.number}
    assert trial_callbacks(OmegaConf.create(base)) == []
    assert trial_callbacks(OmegaConf.create({**base, "optuna_trial": {**ident, "fold": 0}})) == []
    (callback,) = trial_callbacks(OmegaConf.create({**base, "optuna_trial": ident}))

    import lightning as L

    assert isinstance(callback, L.Callback)
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, callback_metrics={"val/acc": 0.5}, current_epoch=0,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), should_stop=False,
    )  # fmt: skip
    callback.on_validation_end(trainer, None)
    assert trainer.should_stop is True
    assert read_record(tmp_path / "run")["state"] == "PRUNED"
    assert study.get_trials()[trial.number].intermediate_values == {1: 0.5}


@pytest.mark.slow
def test_optuna_search_through_real_training(tmp_path):
    tiny = [
        "data.train_subset=64", "data.val_subset=32", "data.test_subset=32", "data.image_size=32",
        *MODEL, "trainer.max_epochs=2",
        "callbacks.progress.refresh_rate=0", "hydra.sweeper.n_trials=2",
    ]  # fmt: skip
    result = sweep(tmp_path, "hparams_search=optuna", *tiny, app=["-m", "visiontune.train"])
    ok(result)
    out = tmp_path / "sweep"
    trials = load_trials(str(out / "optuna.journal"))
    assert len(trials) == 2 and all(t.state in (States.COMPLETE, States.PRUNED) for t in trials)
    assert all(
        set(t.params) == {"optimizer.lr", "finetune.layer_decay", "model.head.dropout"} for t in trials
    )
    # the pruning callback reported val/acc after each epoch it trained
    assert all(list(t.intermediate_values)[:1] == [1] for t in trials)
    for t in trials:
        metrics = json.loads((out / str(t.number) / "metrics.json").read_text())
        if t.state == States.COMPLETE:
            assert t.value == pytest.approx(metrics["val/acc"])
    assert (out / "best.yaml").is_file()
    rows = list(csv.DictReader(open(out / "summary.csv")))  # one row per trial, with its val/acc
    assert len(rows) == 2 and all(row["val/acc"] for row in rows)
