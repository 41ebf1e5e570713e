"""Arrays computed once and reused: the decoded-image cache (`data.cache=none|memory|disk`), and the
store the frozen-feature cache (visiontune.training.features) keeps its features in.

Image folders and CSV lists are JPEG/PNG files: decoding them is most of an epoch's data cost. With
`data.cache=memory|disk` every image is decoded and resized once, to the size the transforms start
from, into one uint8 array (N, 3, S, S); later epochs (and, with `disk`, later runs and sweep trials)
read the array instead of the files. The pre-crop size S is the eval geometry's: the model's size when
`crop_pct` is 1, else the shorter side `floor(size / crop_pct)`, centre-cropped to a square (the eval
centre crop then takes the same pixels). The transforms run on the cached uint8 image as they would
on the decoded file; presets that crop at random from the whole image (basic, strong) are refused,
since the cache no longer holds it. A file that cannot be decoded is reported as before and skipped.
With `disk`, the array is written straight into its memory-mapped file, so it may exceed memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from visiontune.data.files import collate_skip_none, load_image
from visiontune.data.temporaries import remove_stale, temp_path
from visiontune.data.transforms import interpolation_mode
from visiontune.data.workers import ignore_interrupts
from visiontune.data.wrapped import WrappedDataset

log = logging.getLogger("visiontune")
# augment presets that crop at random from the whole image: they cannot start from the cached one
RANDOM_CROP_PRESETS = ("basic", "strong")


class ArrayStore:
    """Arrays by key under `root` (when given and writable) as <key>.npy (which records its dtype) +
    <key>.json (key, shape, bytes, blake2b checksum); loaded memory-mapped. A file whose key, shape, dtype,
    size or checksum does not match is stale or corrupt (bytes overwritten in place keep the size, not the
    checksum): it is reported by name and rebuilt. A root that cannot be written only warns."""

    def __init__(self, root: str | Path | None, what: str = "cache"):
        self.root = Path(root).expanduser() if root else None
        self.what = what

    def _files(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def remove_leftovers(self) -> None:
        """Remove the temporaries that a killed save or build left under root (`visiontune.data.temporaries`)."""
        remove_stale(self.root, ("*.npy.tmp", "*.npy.*.tmp"), self.what)

    def load(self, key: str, dtype) -> np.ndarray | None:
        if self.root is None:
            return None
        data, meta = self._files(key)
        if not (data.is_file() and meta.is_file()):
            return None
        why = None
        try:
            info = json.loads(meta.read_text())
            array = np.load(data, mmap_mode="r")
            ok = (
                info.get("key") == key
                and list(array.shape) == info["shape"]
                and array.dtype == np.dtype(dtype)
            )
            ok = ok and data.stat().st_size == info["bytes"]
            if ok and info.get("blake2b") != file_checksum(data):  # read only once the cheap checks pass
                ok, why = False, "its bytes do not match the checksum written with it"
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            reason = f" ({why})" if why else ""
            log.warning("%s %s is corrupt or stale%s: rebuilding it", self.what, data, reason)
            return None
        return array

    def save(self, key: str, array: np.ndarray) -> bool:
        """Write atomically (temp file, then rename); False (with a warning) when it cannot be written."""
        if self.root is None:
            return False
        data, meta = self._files(key)
        tmp = temp_path(data)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_leftovers()
            with open(tmp, "wb") as f:
                np.save(f, array)
            size = tmp.stat().st_size
            os.replace(tmp, data)
            meta.write_text(json.dumps({"key": key, "shape": list(array.shape), "bytes": size,
                                        "blake2b": file_checksum(data)}))  # fmt: skip
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("%s: cannot write %s (%s); keeping it in memory only", self.what, self.root,
                        exc.strerror or exc)  # fmt: skip
            return False

    def build(self, key: str, shape: tuple, dtype, fill) -> np.ndarray | None:
        """A new array written straight into a memory-mapped file (`fill(array)` fills it), so an array
        larger than memory can be built; renamed into place when complete. None when it cannot be written."""
        if self.root is None:
            return None
        data, meta = self._files(key)
        tmp = temp_path(data)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_leftovers()
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            fill(array)
            array.flush()
            del array
            os.replace(tmp, data)
            meta.write_text(json.dumps({"key": key, "shape": list(shape), "bytes": data.stat().st_size,
                                        "blake2b": file_checksum(data)}))  # fmt: skip
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("%s: cannot write %s (%s); keeping it in memory only", self.what, self.root,
                        exc.strerror or exc)  # fmt: skip
            return None
        return self.load(key, dtype)


def file_checksum(path: Path) -> str:
    """blake2b of a file's bytes, read in chunks (a memory-mapped array may exceed memory)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def files_fingerprint(paths: list[str]) -> str:
    """The files as they are now: paths with sizes and mtimes (a changed file is another fingerprint).

    A path is hashed as the bytes of its name (`os.fsencode`), so a name that is not UTF-8 (its bytes kept
    as surrogates) hashes too."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(os.fsencode(path) + f":{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(os.fsencode(path) + b":missing\n")
    return digest.hexdigest()


def precrop_size(size: int, crop_pct: float) -> int:
    return size if crop_pct >= 1.0 else math.floor(size / crop_pct)


def precrop_geometry(size: int, crop_pct: float, interpolation: str) -> v2.Compose:
    """PIL image -> uint8 (3, S, S) at the pre-crop size (see the module docstring)."""
    interp = interpolation_mode(interpolation)
    s = precrop_size(size, crop_pct)
    if crop_pct >= 1.0:
        steps = [v2.Resize((s, s), interpolation=interp, antialias=True)]
    else:
        steps = [v2.Resize(s, interpolation=interp, antialias=True), PrecropSquare(s, size)]
    return v2.Compose([v2.ToImage(), v2.RGB(), *steps])


def _centre(length: int, crop: int) -> int:
    return int(round((length - crop) / 2.0))  # torchvision's centre-crop offset, rounding included


class PrecropSquare(torch.nn.Module):
    """Cut an S x S square from an image whose shorter side is S, placed so that a later centre crop to
    `size` takes exactly the pixels a centre crop of the whole image would (offsets round differently
    when the margins are odd)."""

    def __init__(self, side: int, size: int):
        super().__init__()
        self.side, self.size = side, size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        top = _centre(height, self.size) - _centre(self.side, self.size)
        left = _centre(width, self.size) - _centre(self.side, self.size)
        return v2.functional.crop(image, top, left, self.side, self.side)


class _Decode(Dataset):
    def __init__(self, paths: list[str], geometry):
        self.paths, self.geometry = paths, geometry

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.geometry(load_image(self.paths[i])).as_subclass(torch.Tensor)
        except Exception as exc:
            warnings.warn(f"skipping unreadable image {self.paths[i]}: {exc}", stacklevel=1)
            return None


def decode_into(images: np.ndarray, paths: list[str], geometry, num_workers: int = 0) -> np.ndarray:
    """Decode every path into `images` (N, 3, S, S) uint8; returns which ones were readable."""
    ok = np.zeros(len(paths), dtype=bool)
    loader = DataLoader(_Decode(paths, geometry), batch_size=64, num_workers=num_workers,
                        collate_fn=collate_skip_none, worker_init_fn=ignore_interrupts)  # fmt: skip
    for batch in loader:
        if batch is None:
            continue
        index, x = batch
        images[index.numpy()] = x.numpy()
        ok[index.numpy()] = True
    return ok


class DecodedImageDataset(WrappedDataset):
    """A file dataset served from its decoded array: the same (image, target) pairs, no decoding."""

    def __init__(self, base: Dataset, images: np.ndarray, readable: np.ndarray):
        self.base, self.images, self.readable = base, images, readable
        self.paths, self.transform = base.paths, base.transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if not self.readable[i]:
            return None  # reported when the cache was built
        image = torch.from_numpy(np.array(self.images[i]))
        return (self.transform(image) if self.transform else image), self.base.target(i)


def cache_decoded(dataset, mode: str, cache_dir, size: int, crop_pct: float, interpolation: str,
                  num_workers: int = 0) -> DecodedImageDataset:  # fmt: skip
    """`dataset` (image files) decoded once into memory or, for mode=disk, a memory-mapped file."""
    s = precrop_size(size, crop_pct)
    parts = {
        "files": files_fingerprint(dataset.paths),
        "size": s,
        "crop_pct": crop_pct,
        "interp": interpolation,
    }
    key = "images-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    store = ArrayStore(cache_dir if mode == "disk" else None, "image cache")
    images = store.load(key, np.uint8)
    readable = store.load(key + "-ok", np.bool_) if images is not None else None
    if images is not None and readable is not None:
        log.info("data.cache=disk: %d images read from %s (no decoding)", len(images), store.root)
        return DecodedImageDataset(dataset, images, readable)
    geometry = precrop_geometry(size, crop_pct, interpolation)
    shape = (len(dataset.paths), 3, s, s)
    found = {}

    def fill(array):
        found["ok"] = decode_into(array, dataset.paths, geometry, num_workers)

    images = store.build(key, shape, np.uint8, fill)  # straight to disk: no copy of it all in memory
    if images is None or not store.save(key + "-ok", found["ok"]):
        images = np.zeros(shape, dtype=np.uint8)
        fill(images)
    log.info("data.cache=%s: decoded %d images to %dx%d once%s", mode, len(images), s, s,
             f" into {store.root}" if mode == "disk" and isinstance(images, np.memmap) else "")  # fmt: skip
    return DecodedImageDataset(dataset, images, found["ok"])
