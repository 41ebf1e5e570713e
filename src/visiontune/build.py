"""The one place that turns a config (or a checkpoint) into a DataModule and a model.

train, eval, preview and every command after training (predict, export, serve, ...) build through
these functions, so a checkpoint is always rebuilt exactly the way it was trained.
"""

from __future__ import annotations

from omegaconf import DictConfig

from visiontune.cli import plain
from visiontune.data import ImageDataModule
from visiontune.data.transforms import batch_mix, eval_transform
from visiontune.models.backbones import backbone_data_config
from visiontune.training.checkpoints import load_classifier
from visiontune.training.module import ImageClassifier

NO_AUGMENT = {"name": "none"}


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The run's data, with transforms from the backbone's pretrained config."""
    task = plain(cfg.task) if cfg.get("task") else None
    config = backbone_data_config(cfg.model.backbone)
    return ImageDataModule(plain(cfg.data), plain(cfg.augment), config, seed=cfg.seed, task=task)


def build_model(cfg: DictConfig, datamodule: ImageDataModule) -> ImageClassifier:
    """A fresh ImageClassifier for the run `cfg` describes, sized to the data's classes."""
    weights = datamodule.class_weights()
    model = ImageClassifier(
        model={k: v for k, v in plain(cfg.model).items() if k != "compile"},
        num_classes=datamodule.num_classes,
        class_names=list(datamodule.classes),
        optim={
            "optimizer": plain(cfg.optimizer),
            "scheduler": plain(cfg.scheduler),
            "finetune": plain(cfg.finetune),
        },
        data=plain(cfg.data),
        monitor=plain(cfg.callbacks.checkpoint),
        seed=cfg.seed,
        class_weights=weights.tolist() if weights is not None else None,
        task=datamodule.task_hparams(),  # None for multiclass; else the task with each head's classes
    )
    model.mix = batch_mix(plain(cfg.augment), datamodule.num_classes)
    if cfg.augment.get("jsd"):
        model.jsd_weight = float(cfg.augment.get("jsd_weight", 12.0))
    return model


def checkpoint_datamodule(model: ImageClassifier, patch: dict | None = None) -> ImageDataModule:
    """The data a checkpoint was trained on (with `patch` over its data config), without augmentation."""
    data = {**model.hparams.data, **(patch or {})}
    return ImageDataModule(
        data, NO_AUGMENT, backbone_data_config(model.hparams.model["backbone"]), seed=model.hparams.seed,
        task=model.hparams.get("task"),
    )  # fmt: skip


def checkpoint_eval_transform(model: ImageClassifier):
    """The eval transform (PIL image or uint8 tensor -> normalised float tensor) of a trained model."""
    return checkpoint_datamodule(model).eval_transform()


__all__ = [
    "build_datamodule",
    "build_model",
    "checkpoint_datamodule",
    "checkpoint_eval_transform",
    "eval_transform",
    "load_classifier",
]
