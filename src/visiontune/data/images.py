"""Image decoding: bytes or a file to an RGB PIL image, the same way in training, predict and serve.

It imports nothing but numpy and PIL, so a deployment's reader (`deploy.preprocess`) stays light.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float32)
        image = Image.fromarray((255.0 * arr / max(float(arr.max()), 1.0)).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def open_image(data: bytes | str | Path) -> Image.Image:
    """Decode raw bytes or a file to an RGB image; anything unreadable raises (OSError, ValueError...)."""
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    with Image.open(source) as image:
        image.load()
        return to_rgb(image)
