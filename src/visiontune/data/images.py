"""Image decoding: bytes or a file to an RGB PIL image, the same way in training, predict and serve.

It imports nothing but numpy and PIL, so a deployment's reader (`deploy.preprocess`) stays light.

Every decoder refuses an image above a pixel limit before it decodes a byte of it: a PNG of a few
kilobytes can declare 12000 x 12000 pixels, half a gigabyte once decoded to RGB (a "pixel bomb").
`Image.open` reads only the header, so the size is known, and checked, before `load()`. PIL's own
`MAX_IMAGE_PIXELS` check is no guard here: below twice its value it only warns.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# 40 MP: above the photos of phones (12-24 MP) and of most cameras (24-45 MP); decoded to RGB it is
# 120 MB. The limit of data.max_pixels and of predict's and serve's max_pixels.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the limit; it was not decoded."""

    def __init__(self, pixels: int, limit: int, size: tuple[int, int] | None = None):
        self.pixels, self.limit, self.size = int(pixels), int(limit), size
        shape = f"{size[0]}x{size[1]} px" if size else f"{self.pixels} px"
        super().__init__(
            f"{shape} ({megapixels(self.pixels)}) is over the limit of {self.limit} px ({megapixels(self.limit)})"
        )

    def __reduce__(self):  # raised in a loader worker process, re-raised in the main one
        return type(self), (self.pixels, self.limit, self.size)


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    """ImageTooLarge when the (still undecoded) image has more than `max_pixels` pixels (None = no limit)."""
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(width * height, max_pixels, (width, height))


def bomb_refusal(exc: Exception, max_pixels: int | None) -> ImageTooLarge:
    """PIL's DecompressionBombError (or its warning, where warnings are errors) as our ImageTooLarge: the
    limit named is the lower of `max_pixels` and PIL's own, which refused it."""
    # PIL says "Image size (N pixels) exceeds limit of M pixels, ..."
    numbers = [int(n) for n in re.findall(r"(\d+) pixels", str(exc))]
    pixels, pil_limit = (numbers + [0, 0])[:2]
    limits = [n for n in (max_pixels, pil_limit) if n]
    return ImageTooLarge(pixels, min(limits) if limits else 0)


def open_checked(source, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`Image.open(source)` (the header only), refused with ImageTooLarge above `max_pixels`."""
    try:
        image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise bomb_refusal(exc, max_pixels) from None
    try:
        check_pixels(image, max_pixels)
    except ImageTooLarge:
        image.close()
        raise
    return image


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


def open_image(data: bytes | str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode raw bytes or a file to an RGB image; anything unreadable raises (OSError, ValueError...),
    an image above `max_pixels` (None = no limit) raises ImageTooLarge before it is decoded."""
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    with open_checked(source, max_pixels) as image:
        image.load()
        return to_rgb(image)
