"""Build the pieces of a run by hand, so tests can look inside the model between steps."""

from __future__ import annotations

import lightning as L
import torch

from visiontune.backbones import backbone_data_config
from visiontune.data import ImageDataModule
from visiontune.finetune import create_strategy
from visiontune.module import ImageClassifier

DATA = {
    "name": "fashion_mnist",
    "root": "data",
    "train_subset": 64,
    "val_fraction": 0.1,
    "val_subset": 32,
    "test_subset": 32,
    "image_size": 32,
    "crop_pct": 1.0,
    "batch_size": 16,
    "num_workers": 0,
}


def make_run(
    finetune: dict,
    backbone: str = "resnet18",
    epochs: int = 1,
    optimizer: dict | None = None,
    scheduler: dict | None = None,
    callbacks: list | None = None,
    data: dict | None = None,
    **trainer_kwargs,
):
    """(trainer, model, datamodule, strategy) for a tiny run; nothing is fitted yet."""
    L.seed_everything(0, verbose=False)
    datamodule = ImageDataModule({**DATA, **(data or {})}, {"name": "none"}, backbone_data_config(backbone))
    model = ImageClassifier(
        backbone=backbone,
        pretrained=False,
        num_classes=10,
        optimizer=optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        scheduler=scheduler or {"name": "none"},
        backbone_lr_mult=finetune.get("backbone_lr_mult", 1.0),
        layer_decay=finetune.get("layer_decay", 1.0),
        data=datamodule.cfg,
    )
    strategy = create_strategy(finetune)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer = L.Trainer(**{**defaults, **trainer_kwargs}, callbacks=[strategy, *(callbacks or [])])
    return trainer, model, datamodule, strategy


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, prefix: str = "") -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}
