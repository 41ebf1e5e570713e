"""Small pieces the commands after training share: the class-name check, raw images of a split and
their names, and quieter warnings. The model side is `deploy.session.InferenceSession`."""

from __future__ import annotations

import logging
import warnings

import numpy as np
from PIL import Image

from visiontune.errors import UserError

log = logging.getLogger("visiontune")


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


def raw_image(dataset, i: int) -> Image.Image:
    """Item `i` of a split as the original RGB PIL image, before any transform."""
    if hasattr(dataset, "paths"):
        from visiontune.data.images import open_image

        return open_image(dataset.paths[i])
    if hasattr(dataset, "raw"):  # a shard split: the stored image, at its pre-crop size
        return Image.fromarray(np.ascontiguousarray(dataset.raw(i).numpy().transpose(1, 2, 0))).convert("RGB")
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
