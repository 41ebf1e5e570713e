"""The one place that turns a config (or a checkpoint) into what runs.

`build_run(cfg)` builds a training run whole, and every decision about it is made here: the data,
the model with its training extras (teacher, MixUp/CutMix, the AugMix JSD weight), `torch.compile`,
the frozen-feature cache, the callbacks, the loggers and the Trainer. `train` only fits and tests
what it returns.

preview builds its data through `build_datamodule`. The commands after training (eval, predict,
export, serve, compress) open a checkpoint through `visiontune.deploy.session.InferenceSession`, which
rebuilds the model from the checkpoint's own hyperparameters, the way it was trained.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import DictConfig

from visiontune.cli import plain
from visiontune.data import ImageDataModule
from visiontune.data.transforms import batch_mix
from visiontune.deploy.inference import check_class_names
from visiontune.errors import UserError
from visiontune.models.backbones import backbone_data_config
from visiontune.sweeper.pruning import trial_callbacks
from visiontune.training.callbacks import (
    BestCheckpoint,
    LastCheckpoint,
    ReadCheck,
    ResumeMidEpoch,
    RunClock,
    SaveOnInterrupt,
    StepLogInterval,
    TrainingCurves,
    format_seconds,
)
from visiontune.training.checkpoints import AtomicCheckpointIO, load_checkpoint
from visiontune.training.distill import Teacher, load_teacher
from visiontune.training.features import FeatureCache, plan_feature_cache
from visiontune.training.finetune import ApplyFreeze
from visiontune.training.module import ImageClassifier

log = logging.getLogger("visiontune")


@dataclass
class Run:
    """A training run, ready to fit: what `build_run` returns."""

    datamodule: ImageDataModule
    model: ImageClassifier  # torch.compile's wrapper of it under model.compile=true
    trainer: L.Trainer
    callbacks: list[L.Callback]  # every callback the trainer was given, in order
    loggers: list
    best: BestCheckpoint  # best.ckpt, by the monitor
    freeze: ApplyFreeze  # the fine-tuning strategy (its parameter counts at fit start)
    interrupts: SaveOnInterrupt
    clock: RunClock  # epochs and images of this process
    feature_cache: FeatureCache | None  # None: the run reads images throughout
    ckpt_dir: Path


def build_run(
    cfg: DictConfig, ckpt_path: str | Path | None = None, callbacks: Sequence[L.Callback] = ()
) -> Run:
    """Everything one training run is made of, built from its config.

    `ckpt_path` is the checkpoint the run resumes from: it must hold the same backbone and classes,
    and its epoch decides whether the feature cache is still of use. `callbacks` join the run's own
    (a script or a test watching the run). Refused in one line (UserError): a teacher trained on other
    classes, torch.compile with a strategy that unfreezes later, cache_features=true where the cache
    is not exact, a CPU run longer than max_cpu_hours.
    """
    run_dir = Path(cfg.paths.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    datamodule = build_datamodule(cfg)
    resumed_epoch = check_resume(ckpt_path, cfg, datamodule) if ckpt_path else 0
    model = build_model(cfg, datamodule, teacher=build_teacher(cfg, datamodule))
    if cfg.model.compile and model.freeze_schedule.unfreezes:
        raise UserError(
            f"model.compile=true with finetune={cfg.finetune.name}: torch.compile does not notice layers "
            "unfrozen later (pytorch #139476). Use finetune=full|linear_probe|freeze_groups or model.compile=false"
        )
    datamodule.setup("fit")
    datamodule.check_splits()  # before the feature cache reads them: an empty split is one line
    cache = plan_feature_cache(model, cfg, resumed_epoch)
    if cfg.model.compile:
        # LoRA trains correctly compiled, only no faster (seen with peft 0.21, torch 2.14)
        if cfg.finetune.name == "lora":
            log.warning("model.compile=true with finetune=lora: torch.compile recompiles peft's LoRA layers past "
                        "its limit and runs them eagerly: expect no speed-up from it")  # fmt: skip
        model = torch.compile(model)

    monitor = cfg.callbacks.checkpoint
    # the layers a whole-run cache stands in for never run: hard-frozen, even where DDP wants a soft freeze
    freeze = ApplyFreeze(soft_freeze=False if cache is not None and cache.hard_freeze else None)
    best = BestCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=monitor.monitor,
        mode=monitor.mode,
        enable_version_counter=False,
    )
    interrupts = SaveOnInterrupt(ckpt_dir)
    clock = RunClock(print_lines=not sys.stdout.isatty())
    everything = [
        freeze,
        *([cache] if cache is not None else []),
        best,
        LastCheckpoint(ckpt_dir),
        interrupts,
        ResumeMidEpoch(),
        # an epoch or the test that reads too few images (files broken mid-run), or an empty split, ends the run
        ReadCheck(cfg.data.get("min_read_fraction", 0.5), ckpt_dir, test=bool(cfg.get("test"))),
        clock,
        StepLogInterval(),  # a short run logs step scalars too
        *(
            [TrainingCurves(run_dir / "curves.png", monitor.monitor)]
            if cfg.callbacks.get("curves", True)
            else []
        ),
        *build_callbacks(cfg),
        *trial_callbacks(cfg),
        *callbacks,
    ]
    loggers = build_loggers(cfg, run_dir)
    slurm = [SLURMEnvironment(auto_requeue=True)] if SLURMEnvironment.detect() else []
    trainer = L.Trainer(
        **plain(cfg.trainer),
        default_root_dir=run_dir,
        callbacks=everything,
        logger=loggers or False,
        # under SLURM: SIGUSR1 (sbatch --signal=SIGUSR1@90) saves hpc_ckpt_N.ckpt and requeues the job
        plugins=[AtomicCheckpointIO(), *slurm],
        enable_model_summary=False,
        enable_progress_bar=sys.stdout.isatty(),
    )
    log.info("run dir: %s", run_dir)
    log.info("data: %s, image size %d, augment=%s", datamodule.name, datamodule.image_size, cfg.augment.name)
    check_cpu_budget(model, datamodule, cfg, trainer)

    # the feature cache first: it reads the splits through their per-sample transforms
    if cache is not None:
        distributed = not isinstance(trainer.strategy, SingleDeviceStrategy)
        if not cache.build(model, datamodule, cfg, trainer.strategy.root_device, distributed):
            cache = None  # ruled out under DDP: the callback stays idle
    device_transforms = cfg.data.get("device_transforms", "auto")
    if cache is not None and cache.until is None:  # every split is read as cached activations
        if device_transforms is True:
            raise UserError(
                "data.device_transforms=true: the splits are not plain in-memory images (e.g. cached features). "
                "Use data.device_transforms=auto"
            )
    else:
        datamodule.enable_device_transforms(device_transforms)
    return Run(
        datamodule, model, trainer, everything, loggers, best, freeze, interrupts, clock, cache, ckpt_dir
    )


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The run's data, with transforms from the backbone's pretrained config."""
    task = plain(cfg.task) if cfg.get("task") else None
    config = backbone_data_config(cfg.model.backbone)
    return ImageDataModule(plain(cfg.data), plain(cfg.augment), config, seed=cfg.seed, task=task)


def build_model(
    cfg: DictConfig, datamodule: ImageDataModule, teacher: Teacher | None = None
) -> ImageClassifier:
    """A fresh ImageClassifier for the run `cfg` describes, sized to the data's classes.

    Its training extras come with it: MixUp/CutMix and the AugMix JSD weight from `augment`, and the
    `teacher` (see `build_teacher`) with `distill.alpha` and `distill.temperature`.
    """
    weights = datamodule.class_weights()
    distill = {"alpha": float(cfg.distill.alpha), "temperature": float(cfg.distill.temperature)}
    return ImageClassifier(
        model={k: v for k, v in plain(cfg.model).items() if k != "compile"},
        num_classes=datamodule.num_classes,
        class_names=list(datamodule.classes),
        optim={
            "optimizer": plain(cfg.optimizer),
            "scheduler": plain(cfg.scheduler),
            "finetune": plain(cfg.finetune),
        },
        data={**plain(cfg.data), **datamodule.stored_geometry()},
        monitor=plain(cfg.callbacks.checkpoint),
        seed=cfg.seed,
        class_weights=weights.tolist() if weights is not None else None,
        task=datamodule.task_hparams(),  # None for multiclass; else the task with each head's classes
        mix=batch_mix(plain(cfg.augment), datamodule.num_classes),
        jsd_weight=float(cfg.augment.get("jsd_weight", 12.0)) if cfg.augment.get("jsd") else 0.0,
        teacher=teacher,
        distill=distill if teacher is not None else None,
    )


def build_teacher(cfg: DictConfig, datamodule: ImageDataModule) -> Teacher | None:
    """`distill.teacher`'s checkpoint as a frozen Teacher that sees the run's batches; None without one."""
    if not cfg.distill.get("teacher"):
        return None
    norm = (datamodule.mean, datamodule.std)
    return load_teacher(cfg.distill.teacher, list(datamodule.classes), norm, datamodule.image_size)


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
    """The loggers the `logger` group turns on, each writing into the run dir."""
    loggers = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(run_dir, name="csv", version=""))
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False))
    if cfg.logger.get("mlflow"):
        from lightning.pytorch.loggers import MLFlowLogger

        mlflow = plain(cfg.logger.mlflow)
        if not mlflow.get("tracking_uri"):  # a SQLite store in the run dir: no server, no environment setting
            mlflow["tracking_uri"] = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            if not mlflow.get("artifact_location"):
                mlflow["artifact_location"] = (run_dir / "mlflow-artifacts").resolve().as_uri()
        loggers.append(MLFlowLogger(**mlflow))
    if cfg.logger.get("wandb"):
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=str(run_dir), **plain(cfg.logger.wandb)))
    return loggers


def check_resume(ckpt_path: str | Path, cfg: DictConfig, datamodule: ImageDataModule) -> int:
    """The checkpoint to resume loads safely, holds the same backbone, and the same class names in order.

    Returns the epoch it was saved in (the resumed run starts there, or at the next one).
    """
    checkpoint = load_checkpoint(ckpt_path)
    hparams = checkpoint["hyper_parameters"]
    trained, backbone = (hparams.get("model") or {}).get("backbone"), cfg.model.backbone
    if trained is None:
        raise UserError(f"{ckpt_path} is not a checkpoint of this visiontune version (no model.backbone)")
    if trained != backbone:
        raise UserError(
            f"{ckpt_path} holds a {trained} model, this run builds {backbone}. "
            f"Fix: model.backbone={trained}, or train {backbone} from scratch without ckpt_path"
        )
    allow_mismatch = bool(cfg.data.get("allow_class_mismatch"))
    check_class_names(hparams.get("class_names"), list(datamodule.classes), allow_mismatch)
    return int(checkpoint.get("epoch") or 0)


def check_cpu_budget(model, datamodule: ImageDataModule, cfg: DictConfig, trainer: L.Trainer) -> None:
    """Estimate the fit's CPU time from one timed forward pass; refuse it above `max_cpu_hours`.

    A bare `visiontune-train` (all of Fashion-MNIST at 224 px for 10 epochs) would run for many hours
    on a laptop; this says so before it starts instead of after.
    """
    if trainer.strategy.root_device.type != "cpu" or trainer.fast_dev_run:
        return
    datamodule.setup("fit")
    per_image = forward_seconds_per_image(model, datamodule.image_size)
    train_size = len(datamodule.train_set)
    max_epochs = cfg.trainer.get("max_epochs")
    bounded = max_epochs is not None and int(max_epochs) > 0
    epochs = int(max_epochs) if bounded else 1000  # Lightning's default
    train_images = train_size * epochs
    if (max_steps := int(cfg.trainer.get("max_steps") or -1)) > 0:
        train_images = min(train_images, max_steps * int(cfg.data.batch_size))
        epochs = max(1, -(-train_images // max(1, train_size)))
    eval_images = len(datamodule.val_set) * epochs + (len(datamodule.test_set) if cfg.get("test") else 0)
    # a training step (forward and backward) costs about three forward passes; AugMix JSD trains on three
    # views of each image, and a teacher adds its forward pass (counted at the student's cost)
    views = 3 if cfg.augment.get("jsd") else 1
    teacher = 1 if cfg.distill.get("teacher") else 0
    seconds = per_image * ((3 + teacher) * views * train_images + eval_images)
    size = datamodule.image_size
    what = f"{train_size} training images x {epochs} epochs at {size} px"
    log.info("estimated CPU time: %s (%s)", format_seconds(seconds), what)
    limit = cfg.get("max_cpu_hours")
    if limit is not None and seconds / 3600 > float(limit):
        # advice that keeps the run's data (an experiment= overlay would swap in its own dataset)
        per_epoch = per_image * ((3 + teacher) * views * train_size + len(datamodule.val_set))
        test_seconds = per_image * (len(datamodule.test_set) if cfg.get("test") else 0)
        fit = int((float(limit) * 3600 - test_seconds) // max(per_epoch, 1e-12))
        fewer = "lower trainer.max_epochs"
        if max_steps > 0:
            fewer = "lower trainer.max_steps"
        elif 1 <= fit < epochs:
            fewer = f"trainer.max_epochs={fit} fits"
        raise UserError(
            f"this run would take about {seconds / 3600:.1f} h on this CPU ({train_size:,} training images x "
            f"{epochs} epochs at {size} px), more than max_cpu_hours={limit}. Shorten it on the same data: "
            f"{fewer}, or lower data.image_size, or train on a seeded part of it (data.train_subset=N); "
            "or train on a GPU (trainer=gpu); or allow it: max_cpu_hours=<hours>, or max_cpu_hours=null for no limit"
        )


def forward_seconds_per_image(model, size: int, batch: int = 16, repeats: int = 5) -> float:
    """Seconds per image of an eval-mode forward pass on zeros (no RNG drawn, no BatchNorm statistics touched).

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


__all__ = [
    "Run",
    "build_callbacks",
    "build_datamodule",
    "build_loggers",
    "build_model",
    "build_run",
    "build_teacher",
]
