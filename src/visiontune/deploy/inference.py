"""What the commands after training share: the data patch from the command line, the class-name check,
logits over a dataset, raw images of a split, and the checkpoint's temperature."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from visiontune.errors import UserError

log = logging.getLogger("visiontune")


def pick_device(accelerator: str = "auto") -> torch.device:
    """cuda for `gpu`/`cuda`, or for `auto` when there is one; else the CPU."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(
                f"accelerator={accelerator} but there is no CUDA device. Fix: trainer.accelerator=cpu"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def temperature_of(model) -> float:
    """The model's stored temperature (eval calibrate=true sets it); 1.0 for an uncalibrated checkpoint."""
    value = model.hparams.get("temperature", 1.0)
    value = 1.0 if value is None else float(value)
    if not value > 0:
        raise UserError(
            f"the checkpoint's temperature is {value}; it must be > 0. Re-run eval calibrate=true"
        )
    return value


def cli_data_patch(cfg: DictConfig) -> dict:
    """The data keys given on the command line (`data.<key>=value`), with their values from cfg.data.

    Only those: the rest of the data config comes from the checkpoint. Empty outside a Hydra run.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    keys = []
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("data."):
            keys.append(key[len("data.") :].split(".", 1)[0])
    return {k: _plain(cfg.data[k]) for k in dict.fromkeys(keys) if k in cfg.data}


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_class_names(checkpoint_names: list[str] | None, data_names: list[str], allow: bool) -> None:
    """The data's classes must be the checkpoint's, by name and in order.

    A different count is always fatal (the labels would index the wrong outputs); different names of
    the same count pass with a warning when `allow` (data.allow_class_mismatch=true).
    """
    if checkpoint_names is None or list(checkpoint_names) == list(data_names):
        return
    difference = describe_class_difference(list(checkpoint_names), list(data_names))
    if len(checkpoint_names) != len(data_names):
        raise UserError(
            f"the data has {len(data_names)} classes, the checkpoint {len(checkpoint_names)} ({difference}). "
            "Fix: point data.root at the data the model was trained on"
        )
    if allow:
        log.warning(
            "class names differ from the checkpoint's (data.allow_class_mismatch=true): %s", difference
        )
        return
    raise UserError(
        f"the data's class names differ from the checkpoint's: {difference}. Fix: point data.root at the "
        "data the model was trained on, or data.allow_class_mismatch=true"
    )


def describe_class_difference(checkpoint_names: list[str], data_names: list[str]) -> str:
    only_ckpt = [n for n in checkpoint_names if n not in data_names]
    only_data = [n for n in data_names if n not in checkpoint_names]
    parts = []
    if only_ckpt:
        parts.append(f"only in the checkpoint: {only_ckpt}")
    if only_data:
        parts.append(f"only in the data: {only_data}")
    if not parts:
        pairs = zip(checkpoint_names, data_names, strict=True)
        moved = [f"#{i} {a} != {b}" for i, (a, b) in enumerate(pairs) if a != b]
        parts.append(f"the same names in another order ({', '.join(moved[:10])})")
    return "; ".join(parts)


class Indexed(Dataset):
    """(index, item) of a dataset whose items may be None (an unreadable file): the index survives."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (i, *item)


def _collate_present(batch):
    return torch.utils.data.default_collate([b for b in batch if b is not None])


def indexed_loader(dataset, like: DataLoader | None = None, batch_size: int = 64) -> DataLoader:
    """In-order batches of (indices, images, labels), unreadable items left out; worker count and
    batch size taken from `like` (the DataModule's own loader) when given."""
    return DataLoader(
        Indexed(dataset),
        batch_size=like.batch_size if like is not None else batch_size,
        num_workers=like.num_workers if like is not None else 0,
        shuffle=False,
        collate_fn=_collate_present,
    )


@torch.no_grad()
def collect_batches(model, loader: DataLoader) -> tuple[torch.Tensor, list, torch.Tensor]:
    """(logits (N, C), the batches' targets as a list, dataset indices (N,)) over an `indexed_loader`."""
    logits, targets, indices = [], [], []
    device = next(model.parameters()).device
    for batch in loader:
        if len(batch) == 0:
            continue
        index, x, y = batch
        logits.append(model(x.to(device)).float().cpu())
        targets.append(y)
        indices.append(index)
    if not logits:
        raise UserError("no readable images in this split. Fix: check data.root and the files in it")
    return torch.cat(logits), targets, torch.cat(indices).long()


def collect_logits(model, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, C), targets (N,), dataset indices (N,)) over an `indexed_loader`, in order."""
    logits, targets, indices = collect_batches(model, loader)
    return logits, torch.cat(targets).long(), indices


def raw_image(dataset, i: int) -> Image.Image:
    """Item `i` of a split as the original RGB PIL image, before any transform."""
    if hasattr(dataset, "paths"):
        from visiontune.data.images import open_image

        return open_image(dataset.paths[i])
    if hasattr(dataset, "images"):
        array = dataset.images[i].numpy()  # uint8 (C, H, W)
        image = Image.fromarray(
            array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
        )
        return image.convert("RGB")
    raise TypeError(f"no raw images in a {type(dataset).__name__}")


def item_name(dataset, i: int, split: str) -> str:
    """A path for file datasets, `<split>[i]` for in-memory ones."""
    return str(dataset.paths[i]) if hasattr(dataset, "paths") else f"{split}[{i}]"


def quiet_warnings() -> None:
    """Lightning's and torch's advice that does not apply to these short CPU commands."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
