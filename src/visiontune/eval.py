"""`python -m visiontune.eval ckpt_path=PATH [data.<key>=...] [calibrate=true] [robustness=true]`: test a
checkpoint and report.

The checkpoint carries its backbone, class names and data config, so nothing but the file is needed;
each `data.<key>=value` given on the command line patches the stored data config (e.g. a new root).
Into the run dir: metrics.json, per_class.csv, confusion_matrix.png, reliability.png, mistakes.png,
report.md and, with calibrate=true, calibrated.ckpt (the same checkpoint with the fitted temperature);
with robustness=true, robustness.csv and robustness.png (accuracy under 10 corruptions x 5 severities,
robustness.py) and robust/* in metrics.json.

test/acc and test/loss are computed exactly as the module's test_step logs them (raw logits), so they
equal what training reported for the same checkpoint; test/nll and test/ece use the temperature.
A multilabel or multitask checkpoint gets its per-head metrics (test/<head>/acc, test/map, ...),
per_label.csv and report.md instead (`REPORTS`: one report per task).

`adapt=bn|tent` evaluates a copy of the model that adapts to the test batches (evaluation/adapt.py): test/*
are then the adapted model's, and robustness=true measures each cell with and without it.

`device=auto|cpu|cuda` says where the model runs (`trainer.accelerator`, its old spelling, still works).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from visiontune.cli import CONF_DIR, data_patch, print_summary, run_cli
from visiontune.config import validate_eval_config
from visiontune.data.temporaries import write_json
from visiontune.deploy.inference import quiet_warnings
from visiontune.deploy.session import InferenceSession, device_setting
from visiontune.errors import UserError
from visiontune.evaluation import calibration, report, robustness
from visiontune.evaluation.adapt import AdaptSettings, make_adapter
from visiontune.training import tasks
from visiontune.training.checkpoints import load_checkpoint, save_atomic

log = logging.getLogger("visiontune")
SUMMARY = ("test/acc", "test/top5", "test/macro_f1", "test/loss", "test/nll", "test/ece", "temperature",
           "val/nll_before", "val/nll_after", "test/ece_after", "robust/clean_acc", "robust/mean_acc",
           "robust/bn/mean_acc", "robust/tent/mean_acc")  # fmt: skip


def evaluate(cfg: DictConfig, patch: dict | None = None) -> dict:
    """Test `cfg.ckpt_path`, write the report into cfg.paths.output_dir; returns metrics.json's content.

    `patch`: data keys over the checkpoint's data config (the command line's `data.*`; None = read
    them from the Hydra command line).
    """
    quiet_warnings()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    validate_eval_config(cfg)
    adapt = adapt_settings(cfg)
    patch = data_patch(cfg) if patch is None else patch
    session = InferenceSession.from_checkpoint(cfg.ckpt_path, device_setting(cfg), patch)
    task = session.task["name"]
    for key in ("calibrate", "robustness"):  # refused before the test pass, not after it
        if task != "multiclass" and cfg.get(key):
            raise UserError(
                f"{key}=true is for multiclass checkpoints; this one is task={task}. Fix: {key}=false"
            )
    datamodule = session.labelled_data()
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    session.adapter = make_adapter(session.model, adapt, session.heads, loader.batch_size)
    logits, targets, indices = session.collect(datamodule.test_set, like=loader)
    return REPORTS[task](session, logits, targets, indices, cfg, run_dir)


def adapt_settings(cfg: DictConfig) -> AdaptSettings:
    """The `adapt` group's settings, refused with calibrate=true: a temperature belongs to the trained
    model, which predict, export and serve run unadapted."""
    settings = AdaptSettings.from_config(cfg.get("adapt"))
    if settings.method != "none" and cfg.get("calibrate"):
        raise UserError(
            f"calibrate=true fits the temperature of the trained model, not of adapt={settings.method}. "
            "Fix: calibrate with adapt=none, then evaluate calibrated.ckpt with adapt"
        )
    return settings


def evaluate_classes(session, logits, targets, indices, cfg: DictConfig, run_dir: Path) -> dict:
    """A multiclass checkpoint: accuracy, calibration and the class report; calibrate=true and
    robustness=true add their parts."""
    targets = targets[session.heads[0].name].long()
    datamodule, temperature = session.datamodule, session.temperature
    metrics: dict = calibration.classification_metrics(logits, targets, temperature)
    metrics.update({"temperature": temperature, "test/images": len(targets), "ckpt_path": str(cfg.ckpt_path)})
    if session.adapter is not None:  # test/* are those of the adapted model
        metrics["adapt"] = session.adapter.method

    fitted = None
    if cfg.calibrate:
        fitted = calibrate(session, logits, targets, cfg, run_dir)
        metrics.update(fitted)
    if cfg.get("robustness"):
        subset, seed = cfg.get("robustness_subset"), int(cfg.get("robustness_seed") or 0)
        like = datamodule.test_dataloader()
        adapters = {session.adapter.method: session.adapter} if session.adapter is not None else {}
        metrics.update(
            robustness.run_robustness(session, subset, seed, run_dir, like=like, adapters=adapters)
        )
    if cfg.report.enabled:
        class_names = list(session.heads[0].classes)
        write_report(run_dir, metrics, logits, targets, indices, datamodule, class_names, fitted, cfg)
    write_json(run_dir / "metrics.json", metrics, indent=2, sort_keys=True)
    print_summary(metrics, run_dir, keys=SUMMARY)
    return metrics


def calibrate(session, test_logits, test_targets, cfg: DictConfig, run_dir: Path) -> dict:
    """Fit one temperature on the validation split; write <run dir>/calibrated.ckpt with it.

    The input checkpoint is never modified: the calibrated copy is the same file with
    hyper_parameters["temperature"] set, which predict, export and serve read.
    """
    datamodule = session.datamodule
    datamodule.setup("fit")
    val_logits, val_targets, _ = session.collect(datamodule.val_set, like=datamodule.val_dataloader())
    val_targets = val_targets[session.heads[0].name].long()
    before = session.temperature
    fitted = calibration.fit_temperature(val_logits, val_targets)
    result = {
        "temperature_fitted": fitted,
        "val/nll_before": calibration.nll(val_logits, val_targets, before),
        "val/nll_after": calibration.nll(val_logits, val_targets, fitted),
        "val/ece_before": calibration.ece(val_logits, val_targets, before),
        "val/ece_after": calibration.ece(val_logits, val_targets, fitted),
        "test/nll_after": calibration.nll(test_logits, test_targets, fitted),
        "test/ece_before": calibration.ece(test_logits, test_targets, before),
        "test/ece_after": calibration.ece(test_logits, test_targets, fitted),
    }
    checkpoint = load_checkpoint(cfg.ckpt_path)
    checkpoint["hyper_parameters"]["temperature"] = fitted
    target = run_dir / "calibrated.ckpt"
    save_atomic(checkpoint, target)  # a full disk is one line, and no .tmp is left behind
    log.info(
        "temperature %.4f (from the validation split): val NLL %.4f -> %.4f, test ECE %.4f -> %.4f; wrote %s",
        fitted, result["val/nll_before"], result["val/nll_after"], result["test/ece_before"],
        result["test/ece_after"], target,
    )  # fmt: skip
    return result


def write_report(run_dir, metrics, logits, targets, indices, datamodule, class_names, fitted, cfg) -> None:
    """per_class.csv, confusion_matrix.png, reliability.png, mistakes.png and report.md."""
    temperature = metrics["temperature"]
    probs = calibration.tempered_softmax(logits, temperature)
    cm = report.confusion_matrix(logits.argmax(1), targets, len(class_names))
    rows = report.per_class_rows(cm, class_names)
    report.write_per_class_csv(rows, run_dir / "per_class.csv")
    report.plot_confusion(cm, class_names, run_dir / "confusion_matrix.png")
    panels = [
        (f"test, T={temperature:.3g}", calibration.reliability_bins(probs, targets), metrics["test/ece"])
    ]
    if fitted:
        after = calibration.tempered_softmax(logits, fitted["temperature_fitted"])
        panels.append((f"test, T={fitted['temperature_fitted']:.3g} (fitted)",
                       calibration.reliability_bins(after, targets), fitted["test/ece_after"]))  # fmt: skip
    report.plot_reliability(panels, run_dir / "reliability.png")
    wrong = report.most_confident_mistakes(probs, targets, int(cfg.report.mistakes))
    images, captions = [], []
    for k in wrong:
        image, _ = datamodule.test_set[int(indices[k])]
        images.append(report.denormalise(image, datamodule.mean, datamodule.std))
        predicted = int(probs[k].argmax())
        captions.append(
            f"{class_names[targets[k]]} / {class_names[predicted]}, {float(probs[k, predicted]):.2f}"
        )
    report.plot_mistakes(images, captions, run_dir / "mistakes.png")
    calib = None
    if fitted:
        calib = {"temperature": fitted["temperature_fitted"], **fitted}
    confusions = report.top_confusions(cm, class_names)
    report.write_report_md(run_dir / "report.md", metrics, rows, confusions, calib, str(cfg.ckpt_path))


def evaluate_heads(session, logits, targets, indices, cfg: DictConfig, run_dir: Path) -> dict:
    """A multilabel or multitask checkpoint: the test metrics exactly as its test_step logs them
    (tasks.head_scores, at the checkpoint's thresholds), per_label.csv and report.md."""
    task = session.task["name"]
    heads, thresholds = session.heads, session.model.head.thresholds.cpu()
    metrics = tasks.head_scores(logits, targets, heads, thresholds, "test", per_label=True)
    metrics.update({"test/images": len(logits), "ckpt_path": str(cfg.ckpt_path), "task": task})
    if cfg.report.enabled:
        rows = report.per_label_rows(session.probabilities(logits), targets, heads, thresholds)
        report.write_per_label_csv(rows, run_dir / "per_label.csv")
        report.write_task_report_md(run_dir / "report.md", metrics, rows, str(cfg.ckpt_path))
    write_json(run_dir / "metrics.json", metrics, indent=2, sort_keys=True)
    shown = [k for k in metrics if k.startswith("test/") and "/ap/" not in k]
    print_summary(metrics, run_dir, keys=tuple(sorted(shown)))
    return metrics


# the report of each task: a multiclass model's is the class report, with calibration and robustness
REPORTS = {"multiclass": evaluate_classes, "multilabel": evaluate_heads, "multitask": evaluate_heads}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
