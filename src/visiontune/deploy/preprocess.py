"""preprocess.json: everything a deployer needs to feed an exported model, and a reader that uses only it.

`preprocess_image` imports nothing but numpy and PIL (PIL only to decode), on purpose: it is what a
service without torch would write from preprocess.json alone, and export's parity check runs the
exported model on its output. It follows the eval transform of training step by step (RGB, resize,
centre crop, scale to [0, 1], normalise), and its resize is torchvision's on uint8 images, done the
same way: antialiased separable filters (bilinear, bicubic with a = -0.5) with weights rounded to
16-bit integers, the horizontal pass first, each pass rounded back to uint8. So its pixels equal the
training transform's exactly (PIL's own `Image.resize` differs by a grey level or more on some pixels).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.data.images import to_rgb

FORMAT_VERSION = 1
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def make_spec(
    image_size: int,
    crop_pct: float,
    interpolation: str,
    mean,
    std,
    class_names: list[str],
    temperature: float,
    output: str,
    backbone: str = "",
) -> dict:
    """The content of preprocess.json (the session adds `task`, the heads' slices). `output` says what
    the model returns: "probabilities" (the temperature already applied) or "logits" (apply it yourself)."""
    if crop_pct >= 1.0:
        resize = {"mode": "exact", "size": [image_size, image_size]}
    else:
        resize = {"mode": "shorter_side", "size": math.floor(image_size / crop_pct)}
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "input_size": [3, image_size, image_size],
        "layout": "NCHW",
        "dtype": "float32",
        "color": "RGB (EXIF orientation applied; transparency composited on white; grey to 3 channels)",
        "resize": resize,
        "crop": {"size": [image_size, image_size], "crop_pct": float(crop_pct), "mode": "center"},
        "interpolation": interpolation,
        "scale": "divide by 255",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "class_names": list(class_names),
        "temperature": float(temperature),
        "output": output,
        "output_note": (
            "each head's probabilities (see task): softmax(logits / temperature) for a multiclass head, "
            "sigmoid(logits) per label of a multilabel head"
            if output == "probabilities"
            else "raw logits: each head's probabilities (see task) are softmax(logits / temperature) "
            "for a multiclass head, sigmoid(logits) per label of a multilabel head"
        ),
    }


def load_spec(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


_KERNELS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


@lru_cache(maxsize=64)
def _resize_matrix(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, int]:
    """(out, in) integer weights and their fixed-point bits for one axis.

    Downscaling widens the filter by the scale (antialiasing). Each output's weights are normalised
    to sum 1, then scaled by 2**bits with the most bits that keep the largest weight below 2**15.
    """
    kernel, radius = _KERNELS[interpolation]
    scale = in_size / out_size
    support = radius * scale if scale >= 1.0 else radius
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    rows, largest = [], 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        weights = [kernel((j + first - center + 0.5) * inv) for j in range(last - first)]
        total = sum(weights)
        if total != 0.0:
            weights = [w / total for w in weights]
        largest = max([largest, *weights])
        rows.append((first, weights))
    bits = 0
    while bits < 22 and int(0.5 + largest * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    matrix = np.zeros((out_size, in_size), dtype=np.int64)
    for i, (first, weights) in enumerate(rows):
        for j, w in enumerate(weights):
            w *= 1 << bits
            matrix[i, first + j] = int(w - 0.5 if w < 0 else w + 0.5)  # round half away from zero
    return matrix, bits


def resize_uint8(pixels: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, as torchvision resizes a uint8 tensor (antialiased)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation {interpolation!r}: preprocess_image knows {', '.join(INTERPOLATIONS)}"
        )
    if interpolation == "nearest":
        rows = [min(int(np.floor(np.float32(i) * np.float32(pixels.shape[0] / height))), pixels.shape[0] - 1)
                for i in range(height)]  # fmt: skip
        cols = [min(int(np.floor(np.float32(j) * np.float32(pixels.shape[1] / width))), pixels.shape[1] - 1)
                for j in range(width)]  # fmt: skip
        return pixels[rows][:, cols]
    x = pixels.astype(np.float64).transpose(2, 0, 1)  # (C, H, W); integer sums stay exact in float64
    if x.shape[2] != width:  # horizontal pass first, rounded to uint8
        matrix, bits = _resize_matrix(x.shape[2], width, interpolation)
        x = _round_shift(x @ matrix.T.astype(np.float64), bits)
    if x.shape[1] != height:
        matrix, bits = _resize_matrix(x.shape[1], height, interpolation)
        x = _round_shift(matrix.astype(np.float64) @ x, bits)
    return x.transpose(1, 2, 0).astype(np.uint8)


def _round_shift(acc: np.ndarray, bits: int) -> np.ndarray:
    """The fixed-point sum back to 0..255: add half, shift right by `bits`, clamp."""
    return np.clip((acc.astype(np.int64) + (1 << (bits - 1))) >> bits, 0, 255).astype(np.float64)


def preprocess_image(image: Image.Image, spec: dict) -> np.ndarray:
    """One PIL image to the model input (3, H, W) float32, following preprocess.json `spec` only."""
    pixels = np.asarray(to_rgb(image), dtype=np.uint8)
    h, w = pixels.shape[:2]
    resize = spec["resize"]
    if resize["mode"] == "exact":
        new_h, new_w = resize["size"]
    else:  # the shorter side to `size`, the longer side in proportion (rounded down)
        short = resize["size"]
        new_h, new_w = (int(short * h / w), short) if w <= h else (short, int(short * w / h))
    if (new_h, new_w) != (h, w):
        pixels = resize_uint8(pixels, new_h, new_w, spec["interpolation"])
    crop_h, crop_w = spec["crop"]["size"]
    h, w = pixels.shape[:2]
    if (h, w) != (crop_h, crop_w):
        top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
        pixels = pixels[top : top + crop_h, left : left + crop_w]
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(spec["mean"], dtype=np.float32)) / np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
