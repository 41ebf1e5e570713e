"""`python -m visiontune.eval ckpt_path=PATH [data.*=...]`: re-test a checkpoint, write metrics.json.

The checkpoint carries its backbone name and data config as plain hyperparameters, so nothing but
the file is needed; non-null `data.*` overrides patch the stored data config (e.g. a new root).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from visiontune.backbones import backbone_data_config
from visiontune.data import ImageDataModule
from visiontune.errors import UserError
from visiontune.module import ImageClassifier
from visiontune.train import CONF_DIR, plain, print_summary, run_cli

log = logging.getLogger("visiontune")


def load_classifier(ckpt_path: str | Path) -> ImageClassifier:
    """Rebuild the model from a checkpoint; the backbone is not re-downloaded (weights come from the file)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist. Fix: ckpt_path=<run dir>/checkpoints/best.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = dict(checkpoint["hyper_parameters"], pretrained=False)
    model = ImageClassifier(**hparams)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def evaluate(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.output_dir)
    model = load_classifier(cfg.ckpt_path)
    data = dict(model.hparams.data)
    data.update({k: v for k, v in plain(cfg.data).items() if v is not None})
    datamodule = ImageDataModule(
        data, {"name": "none"}, backbone_data_config(model.hparams.backbone), seed=model.hparams.seed
    )
    if datamodule.num_classes != model.hparams.num_classes:
        raise UserError(
            f"the data has {datamodule.num_classes} classes, the checkpoint {model.hparams.num_classes}"
        )
    trainer = L.Trainer(
        **plain(cfg.trainer), logger=False, default_root_dir=run_dir, enable_model_summary=False
    )
    results = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    metrics = {k: float(v) for k, v in results.items()}
    metrics["ckpt_path"] = str(cfg.ckpt_path)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print_summary(metrics, run_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
