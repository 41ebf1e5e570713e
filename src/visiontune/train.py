"""`python -m visiontune.train [overrides]`: one fine-tuning run, start to finish.

The whole run reads top to bottom in `train(cfg)`: seed, data, model, callbacks, loggers, Trainer,
fit, test, metrics.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from visiontune.backbones import backbone_data_config
from visiontune.data import ImageDataModule
from visiontune.errors import UserError
from visiontune.finetune import create_strategy
from visiontune.module import ImageClassifier
from visiontune.transforms import batch_mix

log = logging.getLogger("visiontune")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def plain(node) -> dict:
    """An OmegaConf node as plain Python containers (what checkpoints may hold)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to `<name>.tmp`, then rename it over the old one.

    A crash (or a full disk) while saving leaves the previous `last.ckpt` whole, never half-written.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote file systems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class SaveOnException(L.Callback):
    """On an exception mid-run, save `on_exception.ckpt` beside `last.ckpt` (which stays as it was).

    Lightning's own OnExceptionCheckpoint also makes every `fit(ckpt_path=None)` resume from
    `last.ckpt` when one exists, which would silently continue an old run in a reused run dir.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        trainer.save_checkpoint(self.path)


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    cb = cfg.callbacks
    callbacks: list[L.Callback] = [
        create_strategy(plain(cfg.finetune)),
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor=cb.checkpoint.monitor,
            mode=cb.checkpoint.mode,
            save_last=True,
            auto_insert_metric_name=False,
        ),
        # an exception mid-epoch also saves checkpoints/on_exception.ckpt (last.ckpt stays as it was)
        SaveOnException(run_dir / "checkpoints" / "on_exception.ckpt"),
        RichProgressBar(refresh_rate=cb.progress.refresh_rate, leave=True),
    ]
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


def train(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint, write metrics.json; return `cfg.optimized_metric`."""
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = ImageDataModule(
        plain(cfg.data), plain(cfg.augment), backbone_data_config(cfg.model.backbone), seed=cfg.seed
    )
    model = ImageClassifier(
        backbone=cfg.model.backbone,
        pretrained=cfg.model.pretrained,
        num_classes=datamodule.num_classes,
        class_names=datamodule.classes,
        head_dropout=cfg.model.head.dropout,
        head_hidden=cfg.model.head.hidden,
        label_smoothing=cfg.model.label_smoothing,
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        backbone_lr_mult=cfg.finetune.backbone_lr_mult,
        layer_decay=cfg.finetune.layer_decay,
        channels_last=cfg.model.channels_last,
        data=plain(cfg.data),
        augment=plain(cfg.augment),
        seed=cfg.seed,
        class_weights=weights.tolist() if (weights := datamodule.class_weights()) is not None else None,
    )
    model.mix = batch_mix(plain(cfg.augment), datamodule.num_classes)
    callbacks = build_callbacks(cfg, run_dir)
    strategy = callbacks[0]
    if cfg.model.compile:
        if strategy.unfreezes:
            raise UserError(
                f"model.compile=true with finetune={strategy.name}: torch.compile does not notice layers "
                "unfrozen later (pytorch #139476). Use finetune=full|linear_probe|freeze_groups or model.compile=false"
            )
        model = torch.compile(model)

    trainer = L.Trainer(
        **plain(cfg.trainer),
        default_root_dir=run_dir,
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir) or False,
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
    )
    log.info("run dir: %s", run_dir)
    log.info("data: %s, image size %d, augment=%s", datamodule.name, datamodule.image_size, cfg.augment.name)

    suggestion = find_lr(trainer, model, datamodule, cfg, run_dir) if cfg.tune.lr_find else None
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Exception:
        log.error("training crashed; continue with ckpt_path=%s", run_dir / "checkpoints" / "last.ckpt")
        raise
    train_time = time.perf_counter() - start
    if trainer.interrupted:
        raise UserError(
            "training was interrupted; resume with ckpt_path=" + str(run_dir / "checkpoints/last.ckpt")
        )

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("lr-")}
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    if checkpoint.best_model_score is not None:
        metrics["val/acc"] = float(checkpoint.best_model_score)
    if cfg.get("test"):
        ckpt = "best" if checkpoint.best_model_path else None
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        metrics.update({k: float(v) for k, v in tested[0].items()})
    metrics.update(
        train_time_s=round(train_time, 2),
        epochs=trainer.current_epoch,
        train_images=len(datamodule.train_set),
        images_per_s=round(len(datamodule.train_set) * trainer.current_epoch / max(train_time, 1e-9), 1),
        **strategy.start_counts,
        best_ckpt=checkpoint.best_model_path,
        lr=model.lr,
    )
    if suggestion is not None:
        metrics["lr_find/suggestion"] = suggestion
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        print_summary(metrics, run_dir)
    return metrics.get(cfg.optimized_metric, float("nan"))


def find_lr(trainer: L.Trainer, model: ImageClassifier, datamodule, cfg: DictConfig, run_dir: Path) -> float:
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


def print_summary(metrics: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"visiontune run: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "val/acc",
        "test/acc",
        "test/loss",
        "train_time_s",
        "images_per_s",
        "trainable_params",
        "frozen_params",
    ):
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) and value < 10 else f"{value:,}")
    Console().print(table)


def run_cli(task, cfg: DictConfig):
    """Run `task(cfg)`; bad input ends with one line on stderr and exit code 2, not a traceback."""
    try:
        return task(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    return run_cli(train, cfg)


if __name__ == "__main__":
    main()
