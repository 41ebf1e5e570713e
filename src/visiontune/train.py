"""`python -m visiontune.train [overrides]`: one fine-tuning run, start to finish.

The whole run reads top to bottom in `train(cfg)`: checks, seed, data, model, callbacks, loggers,
Trainer, fit, test, metrics.json. The pieces are built by `visiontune.build`, like every other command.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from visiontune.build import build_datamodule, build_model
from visiontune.cli import CONF_DIR, SUMMARY_KEYS, RunStopped, plain, print_summary, run_cli
from visiontune.config import validate_config
from visiontune.deploy.inference import check_class_names
from visiontune.errors import UserError
from visiontune.sweeper.pruning import trial_callbacks
from visiontune.training.callbacks import (
    LastCheckpoint,
    ResumeMidEpoch,
    RunClock,
    SaveOnInterrupt,
    format_seconds,
)
from visiontune.training.checkpoints import AtomicCheckpointIO, load_checkpoint
from visiontune.training.distill import load_teacher
from visiontune.training.features import attach_feature_cache
from visiontune.training.finetune import ApplyFreeze

log = logging.getLogger("visiontune")


def train(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint, write metrics.json; return the optimized metric (the monitor's best)."""
    validate_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = cfg.get("ckpt_path") or requeued_slurm_checkpoint(run_dir)
    check_run_dir(ckpt_dir, ckpt_path, bool(cfg.get("restart")))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    model = build_model(cfg, datamodule)
    if cfg.distill.teacher:
        teacher = load_teacher(
            cfg.distill.teacher,
            list(datamodule.classes),
            (datamodule.mean, datamodule.std),
            datamodule.image_size,
        )
        model.set_teacher(teacher, cfg.distill.alpha, cfg.distill.temperature)
    resumed_epoch = 0
    if ckpt_path:
        resumed_epoch = check_resume(
            ckpt_path, cfg.model.backbone, datamodule.classes, bool(cfg.data.get("allow_class_mismatch"))
        )
    if cfg.model.compile:
        if model.freeze_schedule.unfreezes:
            raise UserError(
                f"model.compile=true with finetune={cfg.finetune.name}: torch.compile does not notice layers "
                "unfrozen later (pytorch #139476). Use finetune=full|linear_probe|freeze_groups or model.compile=false"
            )
        model = torch.compile(model)

    monitor, mode = cfg.callbacks.checkpoint.monitor, cfg.callbacks.checkpoint.mode
    best = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, enable_version_counter=False
    )
    interrupts = SaveOnInterrupt(ckpt_dir)
    freeze = ApplyFreeze()
    clock = RunClock(print_lines=not sys.stdout.isatty())
    callbacks = [
        freeze,
        best,
        LastCheckpoint(ckpt_dir),
        interrupts,
        ResumeMidEpoch(),
        clock,
        *build_callbacks(cfg),
    ]
    callbacks += trial_callbacks(cfg)
    trainer = L.Trainer(
        **plain(cfg.trainer),
        default_root_dir=run_dir,
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir) or False,
        # under SLURM: SIGUSR1 (sbatch --signal=SIGUSR1@90) saves hpc_ckpt_N.ckpt and requeues the job
        plugins=[
            AtomicCheckpointIO(),
            *([SLURMEnvironment(auto_requeue=True)] if SLURMEnvironment.detect() else []),
        ],
        enable_model_summary=False,
        enable_progress_bar=sys.stdout.isatty(),
    )
    log.info("run dir: %s", run_dir)
    log.info("data: %s, image size %d, augment=%s", datamodule.name, datamodule.image_size, cfg.augment.name)
    check_cpu_budget(model, datamodule, cfg, trainer)
    # the frozen-feature cache first: it reads the splits through their per-sample transforms
    cache_start = time.perf_counter()
    cached = attach_feature_cache(
        model, datamodule, cfg, trainer.strategy.root_device, trainer, resumed_epoch
    )
    cache_time = time.perf_counter() - cache_start
    datamodule.enable_device_transforms(cfg.data.get("device_transforms", "auto"))

    suggestion = find_lr(trainer, model, datamodule, cfg, run_dir) if cfg.tune.lr_find else None
    start = time.perf_counter()
    fit(trainer, model, datamodule, ckpt_path, interrupts, ckpt_dir)
    train_time = time.perf_counter() - start

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("lr-")}
    if best.best_model_score is not None:  # the best value of the monitor, under its own name
        metrics[monitor] = float(best.best_model_score)
    if cfg.get("test"):
        ckpt = best.best_model_path or None
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        metrics.update({k: float(v) for k, v in tested[0].items()})
    metrics.update(
        train_time_s=round(train_time, 2),
        epochs=trainer.current_epoch,
        epochs_this_run=clock.epochs,
        train_images=len(datamodule.train_set),
        images_per_s=round(clock.images / max(train_time, 1e-9), 1),
        **freeze.start_counts,
        best_ckpt=best.best_model_path,
        lr=model.lr,
        peak_rss_mb=peak_rss_mb(),
    )
    if cached:  # the frozen layers' pass over the data, before (and not in) train_time_s
        metrics["feature_cache_s"] = round(cache_time, 2)
    if suggestion is not None:
        metrics["lr_find/suggestion"] = suggestion
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        # a task's per-head test figures (test/<head>/acc, test/map, ...) follow the monitor
        heads = sorted(
            k for k in metrics if k.startswith("test/") and k.endswith(("/acc", "/map", "/f1", "/score"))
        )
        keys = dict.fromkeys((monitor, *heads, *SUMMARY_KEYS))
        print_summary(metrics, run_dir, keys=tuple(keys))
    return metrics.get(cfg.get("optimized_metric") or monitor, float("nan"))


def fit(
    trainer: L.Trainer, model, datamodule, ckpt_path, interrupts: SaveOnInterrupt, ckpt_dir: Path
) -> None:
    """`trainer.fit`, with interrupts and crashes turned into one line that says how to continue."""
    try:
        with warnings.catch_warnings():
            # ResumeMidEpoch makes a mid-epoch resume exact, which Lightning cannot see from the loader
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except UserError:
        raise
    except (SystemExit, KeyboardInterrupt) as exc:  # Lightning ends SIGTERM and SIGINT with SystemExit
        if interrupts.signal is None:
            raise
        where = f"resume with ckpt_path={interrupts.saved}" if interrupts.saved else "nothing was trained yet"
        raise RunStopped(
            f"interrupted by {interrupts.signal.name} in epoch {trainer.current_epoch} "
            f"(step {trainer.global_step}); {where}",
            128 + int(interrupts.signal),
        ) from exc
    except Exception:
        if interrupts.saved:
            last = ckpt_dir / "last.ckpt"
            also = f" (or the last epoch end: ckpt_path={last})" if last.is_file() else ""
            log.error("training crashed; continue with ckpt_path=%s%s", interrupts.saved, also)
        raise
    if trainer.interrupted:  # stopped without an exception we could see
        raise RunStopped(f"training was interrupted; resume with ckpt_path={ckpt_dir / 'last.ckpt'}", 1)


def check_run_dir(ckpt_dir: Path, ckpt_path: str | None, restart: bool) -> None:
    """A run dir that holds checkpoints of an earlier run: resume it, or move them aside on request."""
    old = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not old or ckpt_path:
        return
    if not restart:
        raise UserError(
            f"{ckpt_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in old)}). Resume it with "
            f"ckpt_path={ckpt_dir / 'last.ckpt'}, or start fresh with restart=true (moves them aside)"
        )
    aside = ckpt_dir.with_name(f"checkpoints.{datetime.now():%Y%m%d-%H%M%S}")
    ckpt_dir.rename(aside)
    log.warning("restart=true: moved the earlier run's checkpoints to %s", aside)


def requeued_slurm_checkpoint(run_dir: Path) -> Path | None:
    """A requeued SLURM job's newest state: Lightning's `hpc_ckpt_N.ckpt`, or our interrupted/last checkpoint.

    The requeued job runs the same command in the same run dir, so this is what it continues from.
    """
    if not SLURMEnvironment.detect() or int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None  # a new job, not a requeued one: the run dir rules apply as everywhere
    ours = [run_dir / "checkpoints" / name for name in ("interrupted.ckpt", "last.ckpt")]
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(p for p in ours if p.is_file())]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    log.info("SLURM job %s was requeued: resuming from %s", os.environ.get("SLURM_JOB_ID", "?"), newest)
    return newest


def peak_rss_mb() -> float | None:
    """The largest resident set of this process so far, in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def check_resume(ckpt_path: str | Path, backbone: str, classes: list[str], allow_mismatch: bool) -> int:
    """The checkpoint to resume loads safely, holds the same backbone, and the same class names in order.

    Returns the epoch it was saved in (the resumed run starts there, or at the next one).
    """
    checkpoint = load_checkpoint(ckpt_path)
    hparams = checkpoint["hyper_parameters"]
    trained = (hparams.get("model") or {}).get("backbone")
    if trained is None:
        raise UserError(f"{ckpt_path} is not a checkpoint of this visiontune version (no model.backbone)")
    if trained != backbone:
        raise UserError(
            f"{ckpt_path} holds a {trained} model, this run builds {backbone}. "
            f"Fix: model.backbone={trained}, or train {backbone} from scratch without ckpt_path"
        )
    check_class_names(hparams.get("class_names"), list(classes), allow_mismatch)
    return int(checkpoint.get("epoch") or 0)


def check_cpu_budget(model, datamodule, cfg: DictConfig, trainer: L.Trainer) -> None:
    """Estimate the fit's CPU time from one timed forward pass; refuse it above `max_cpu_hours`.

    A bare `python -m visiontune.train` (all of Fashion-MNIST at 224 px for 10 epochs) would run for
    many hours on a laptop; this says so before it starts instead of after.
    """
    if trainer.strategy.root_device.type != "cpu" or trainer.fast_dev_run:
        return
    datamodule.setup("fit")
    per_image = forward_seconds_per_image(model, datamodule.image_size)
    max_epochs = cfg.trainer.get("max_epochs")
    epochs = (
        int(max_epochs) if max_epochs is not None and int(max_epochs) > 0 else 1000
    )  # Lightning's default
    train_images = len(datamodule.train_set) * epochs
    if (max_steps := int(cfg.trainer.get("max_steps") or -1)) > 0:
        train_images = min(train_images, max_steps * int(cfg.data.batch_size))
        epochs = max(1, -(-train_images // max(1, len(datamodule.train_set))))
    eval_images = len(datamodule.val_set) * epochs + (len(datamodule.test_set) if cfg.get("test") else 0)
    # a training step (forward and backward) costs about three forward passes; AugMix JSD trains on three
    # views of each image, and a teacher adds its forward pass (counted at the student's cost)
    views = 3 if cfg.augment.get("jsd") else 1
    teacher = 1 if cfg.distill.get("teacher") else 0
    seconds = per_image * ((3 + teacher) * views * train_images + eval_images)
    log.info(
        "estimated CPU time: %s (%d training images x %d epochs at %d px)",
        format_seconds(seconds), len(datamodule.train_set), epochs, datamodule.image_size,
    )  # fmt: skip
    limit = cfg.get("max_cpu_hours")
    if limit is not None and seconds / 3600 > float(limit):
        raise UserError(
            f"this run would take about {seconds / 3600:.1f} h on this CPU ({len(datamodule.train_set):,} "
            f"training images x {epochs} epochs at {datamodule.image_size} px), more than max_cpu_hours={limit}. "
            "Shorten it (experiment=fashion_mnist_lite0, or lower data.train_subset, data.image_size, "
            "trainer.max_epochs), or allow it with max_cpu_hours=null"
        )


def forward_seconds_per_image(model, size: int, batch: int = 16, repeats: int = 5) -> float:
    """Seconds per image of an eval-mode forward pass on zeros (no RNG drawn, no BN statistics touched).

    The fastest of a few passes: the first pays for kernel selection, and other processes on the
    machine only ever make a pass slower.
    """
    x = torch.zeros(batch, 3, size, size)
    was_training = model.training
    model.eval()
    timings = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            timings.append(time.perf_counter() - start)
    model.train(was_training)
    return min(timings) / batch


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The optional callbacks the config asks for (progress bar, LR monitor, EMA, early stopping)."""
    cb = cfg.callbacks
    callbacks: list[L.Callback] = []
    if sys.stdout.isatty():
        callbacks.append(RichProgressBar(refresh_rate=cb.progress.refresh_rate, leave=True))
    if cb.lr_monitor and any(cfg.logger.values()):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cb.get("ema"):
        from lightning.pytorch.callbacks import EMAWeightAveraging

        # Validation, test and the checkpoints use the averaged weights.
        callbacks.append(EMAWeightAveraging(**plain(cb.ema)))
    if cb.get("early_stopping"):
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(**plain(cb.early_stopping)))
    return callbacks


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(run_dir, name="csv", version=""))
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False))
    if cfg.logger.get("mlflow"):
        from lightning.pytorch.loggers import MLFlowLogger

        mlflow = plain(cfg.logger.mlflow)
        if not mlflow.get("tracking_uri"):  # a local file store in the run dir, no server needed
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow["tracking_uri"] = (run_dir / "mlruns").resolve().as_uri()
        loggers.append(MLFlowLogger(**mlflow))
    if cfg.logger.get("wandb"):
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=str(run_dir), **plain(cfg.logger.wandb)))
    return loggers


def find_lr(trainer: L.Trainer, model, datamodule, cfg: DictConfig, run_dir: Path) -> float:
    """Lightning's LR range test; its suggestion becomes optimizer.lr, the plot goes to lr_find.png."""
    from lightning.pytorch.tuner import Tuner

    finder = Tuner(trainer).lr_find(
        model,
        datamodule=datamodule,
        min_lr=cfg.tune.min_lr,
        max_lr=cfg.tune.max_lr,
        num_training=cfg.tune.num_training,
        attr_name="lr",
        update_attr=True,
        early_stop_threshold=None,
    )
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise UserError(
            "the LR finder found no suggestion; raise tune.num_training or set optimizer.lr yourself"
        )
    if trainer.is_global_zero:
        import matplotlib

        matplotlib.use("Agg")
        finder.plot(suggest=True).savefig(run_dir / "lr_find.png")
    log.info("LR finder suggests optimizer.lr=%.3g (plot: %s)", suggestion, run_dir / "lr_find.png")
    return float(suggestion)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    return run_cli(train, cfg)


if __name__ == "__main__":
    main()
