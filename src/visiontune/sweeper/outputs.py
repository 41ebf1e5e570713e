"""The end of a study, in the sweep dir: optimization_history.png, param_importances.png, best.yaml."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


def write(study, sweep_dir: Path, best_command: Callable[[dict], tuple[list[str], str]]) -> None:
    """Plots and best.yaml from every trial in the study (including those of other workers and runs)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    log.info("optuna study '%s': %s", study.study_name, ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    if not complete:
        log.warning("no complete trial in study '%s': no plots, no best.yaml", study.study_name)
        return
    plot(study, sweep_dir / "optimization_history.png", "plot_optimization_history")
    if len(complete) < 2:
        log.warning(
            "param_importances.png skipped: it needs 2 complete trials, the study has %d", len(complete)
        )
    else:
        plot(study, sweep_dir / "param_importances.png", "plot_param_importances")
    write_best(study, sweep_dir / "best.yaml", best_command)


def plot(study, path: Path, name: str) -> None:
    """Save one of Optuna's matplotlib plots; a plot that cannot be drawn is a warning, not a failure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend and PED-ANOVA
            kwargs = {}
            if name == "plot_param_importances":
                from optuna.importance import PedAnovaImportanceEvaluator

                # PED-ANOVA: deterministic, and no scikit-learn (Optuna's default fANOVA needs it)
                kwargs["evaluator"] = PedAnovaImportanceEvaluator()
            ax = getattr(vis, name)(study, **kwargs)
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
        plt.close(ax.figure)
    except Exception as exc:
        log.warning(
            "%s skipped: %s", path.name, str(exc).strip().splitlines()[0] if str(exc).strip() else exc
        )


def write_best(study, path: Path, best_command: Callable[[dict], tuple[list[str], str]]) -> None:
    best = study.best_trial
    overrides, command = best_command(best.params)
    data = {
        "study_name": study.study_name,
        "trial": best.number,
        "value": best.value,
        "direction": study.direction.name.lower(),
        "params": best.params,
        "overrides": overrides,
        "command": command,
    }
    header = f"# Best trial of Optuna study '{study.study_name}'. Train it once more:\n#   {command}\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=1000))
    log.info("best trial %d: %s; its overrides: %s", best.number, best.value, path)
