"""Shards: a dataset decoded once into LitData chunks, read from a local folder or object storage.

`visiontune-shard` (`visiontune.preview.shard`) writes what `data=<any option>` reads (its train, val and
test splits, after the splits and subsets of the config) with LitData's `BinaryWriter`: each image decoded
once and stored as uint8 at the transforms' pre-crop size (as `data.cache` stores it; a grey image as one
channel), in a seeded random order so that every chunk holds a mix of classes. A shard set is a folder:

    <out>/manifest.json           classes, task heads, image geometry, the source's fingerprint, per split:
                                  its size, labels, and the sha256 of its index.json and chunk list
    <out>/<split>/index.json      LitData's index of the split's chunks
    <out>/<split>/chunk-*.bin     the chunks

The manifest is written last: a killed run leaves a folder without one, which `data=shards` refuses. Each
split is written under `<split>.tmp/` and renamed when whole; `progress.json` records the source's
fingerprint, so a rerun keeps the splits already written (or starts over for another source) and says so.

`data=shards data.root=<folder or s3://, gs://, ...>` reads them (`open_shards`, `ShardImageDataset`). Items
are read by index through LitData's `StreamingDataset`; the visiontune sampler gives each rank a disjoint
run of whole chunks, shuffled chunk by chunk (`EpochShuffleSampler` with `groups`), so a reader moves from
chunk to chunk and a resume continues exactly where it stopped. A remote root is read through a local
cache bounded by `data.cache_limit`: every loader process keeps its share of it in a folder of its own and
drops its least recently read chunks beyond that share.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visiontune.data.cache import files_fingerprint, precrop_geometry, precrop_size
from visiontune.data.files import load_image
from visiontune.data.temporaries import write_json
from visiontune.data.workers import ignore_interrupts
from visiontune.errors import UserError

log = logging.getLogger("visiontune")
# LitData's INFO lines (its cache sizing, its POSIX fast path) are about its own streaming mode, not this use
logging.getLogger("litdata").setLevel(logging.WARNING)
FORMAT = "visiontune-shards"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SPLITS = ("train", "val", "test")
DEFAULT_CACHE = Path("~/.cache/visiontune/shards")


def is_remote(root: str) -> bool:
    """A root read through the local cache: a URL, or LitData's `local:<folder>` (a folder read as if remote,
    e.g. a slow shared file system)."""
    return "://" in str(root) or str(root).startswith("local:")


def parse_bytes(value) -> int:
    """A size as bytes: an integer, or a string like 500MB, 20GB, 1.5GiB."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", str(value).lower())
    if not match:
        raise UserError(f"invalid size {value!r}: give bytes or a size like 500MB, 20GB")
    unit = match.group(2).rstrip("b")
    scale = {
        "": 1,
        "k": 1e3,
        "m": 1e6,
        "g": 1e9,
        "t": 1e12,
        "ki": 2**10,
        "mi": 2**20,
        "gi": 2**30,
        "ti": 2**40,
    }
    return int(float(match.group(1)) * scale[unit])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- writing ------------------------------------------------------------------------------------------
class _Items(Dataset):
    """(position, uint8 image (3, S, S), target) of a split's images in the write order."""

    def __init__(self, dataset, order: np.ndarray, geometry):
        self.dataset, self.order, self.geometry = dataset, order, geometry

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        i = int(self.order[k])
        if hasattr(self.dataset, "paths"):
            try:
                image = self.geometry(
                    load_image(self.dataset.paths[i], getattr(self.dataset, "max_pixels", None))
                )
            except Exception as exc:  # reported by the writer, which leaves the image out
                return k, None, f"{self.dataset.paths[i]}: {exc}"
        else:
            image = self.geometry(self.dataset.images[i])
        image = image.as_subclass(torch.Tensor)
        if torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]):
            image = image[:1]  # a grey image: one channel stored, three read (a third of the bytes)
        return k, image.numpy(), self.dataset.target(i)


def _plain_target(target):
    """A target as LitData stores it and JSON lists it: an int, or {head: int or a list of floats}."""
    if isinstance(target, dict):
        return {
            h: (v.tolist() if v.ndim else int(v))
            for h, v in ((h, torch.as_tensor(v)) for h, v in target.items())
        }
    return int(target)


def _stored_target(target):
    if isinstance(target, dict):
        return {
            h: (np.asarray(v, dtype=np.float32) if isinstance(v, list) else int(v)) for h, v in target.items()
        }
    return target


def source_fingerprint(datamodule, geometry: dict) -> str:
    """What the shards hold: each split's files (paths, sizes, mtimes) or in-memory images, its labels, and
    the stored geometry. The same config over unchanged files gives the same fingerprint."""
    digest = hashlib.sha256(json.dumps(geometry, sort_keys=True).encode())
    for split in SPLITS:
        dataset = getattr(datamodule, f"{split}_set")
        digest.update(f"{split}:{len(dataset)}".encode())
        if hasattr(dataset, "paths"):
            digest.update(files_fingerprint(dataset.paths).encode())
        else:
            digest.update(np.ascontiguousarray(dataset.images.numpy()).tobytes())
        targets = [_plain_target(dataset.target(i)) for i in range(len(dataset))]
        digest.update(json.dumps(targets).encode())
    return digest.hexdigest()


def write_shards(
    datamodule, out: Path, seed: int, num_workers: int, chunk_bytes: int, overwrite: bool
) -> dict:
    """Write the datamodule's splits as a shard set at `out` (see the module docstring); returns the summary."""
    from litdata.streaming.writer import BinaryWriter
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    out = Path(out).expanduser()
    marks = (out / MANIFEST).is_file() or (out / PROGRESS).is_file()
    # a folder that holds anything but a shard set is never cleared, overwrite=true or not
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not marks):
        raise UserError(f"out={out} is not empty and holds no shard set. Fix: out=<an empty or new folder>")
    datamodule.setup("fit")
    begin = time.perf_counter()
    size, crop, interp = datamodule.image_size, datamodule.crop_pct, datamodule.interpolation
    geometry = {
        "image_size": size,
        "crop_pct": crop,
        "interpolation": interp,
        "stored_size": precrop_size(size, crop),
    }
    fingerprint = source_fingerprint(datamodule, geometry)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fingerprint:
            log.info("%s already holds these shards (same source and geometry): nothing to write", out)
            return {**summary_of(out, old), "seconds": 0.0, "skipped": True}
        if not overwrite:
            raise UserError(
                f"{out} already holds a shard set of another source or geometry. Fix: out=<another folder>, "
                "or overwrite=true to replace it"
            )
        manifest_path.unlink()
    progress_path = out / PROGRESS
    done: list[str] = []
    if progress_path.is_file():
        state = json.loads(progress_path.read_text())
        if state.get("fingerprint") == fingerprint:
            done = [s for s in state.get("done", []) if (out / s / "index.json").is_file()]
            log.info("%s: resuming an unfinished shard set: %s", out,
                     f"{', '.join(done)} already written" if done else "no split was finished")  # fmt: skip
        else:
            log.info("%s: starting over (its unfinished shards are of another source or geometry)", out)
    for name in (*SPLITS, *(f"{split}.tmp" for split in SPLITS)):  # what a shard set holds, and nothing else
        if name not in done and (out / name).is_dir():
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    write_json(progress_path, {"fingerprint": fingerprint, "done": done})

    geometry_fn = precrop_geometry(size, crop, interp)
    splits, skipped = {}, []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        for split in SPLITS:
            dataset = getattr(datamodule, f"{split}_set")
            order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(dataset))
            if split not in done:
                task = progress.add_task(f"shard {split}", total=len(order))
                tmp = out / f"{split}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                writer = BinaryWriter(str(tmp), chunk_bytes=chunk_bytes)
                loader = DataLoader(_Items(dataset, order, geometry_fn), batch_size=64, num_workers=num_workers,
                                    collate_fn=list, worker_init_fn=ignore_interrupts)  # fmt: skip
                written, targets = 0, []
                for batch in loader:
                    for _k, image, target in batch:
                        if image is None:
                            skipped.append(target)
                            continue
                        writer[written] = {"image": image, "label": _stored_target(_plain_target(target))}
                        targets.append(_plain_target(target))
                        written += 1
                    progress.advance(task, len(batch))
                writer.done()
                writer.merge()
                write_json(tmp / "targets.json", targets)
                os.replace(tmp, out / split)
                done.append(split)
                write_json(progress_path, {"fingerprint": fingerprint, "done": done})
                progress.remove_task(task)
            splits[split] = _split_record(out / split)
    for problem in skipped:
        log.warning("skipped an unreadable image: %s", problem)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "source": {"data": datamodule.name, "root": str(datamodule.root)},
        "classes": list(datamodule.classes),
        "task": datamodule.task_hparams(),
        **geometry,
        "splits": splits,
    }
    write_json(manifest_path, manifest)
    progress_path.unlink()
    return {**summary_of(out, manifest), "seconds": time.perf_counter() - begin, "skipped": False}


def _split_record(folder: Path) -> dict:
    index = json.loads((folder / "index.json").read_text())
    targets = json.loads((folder / "targets.json").read_text())
    return {
        "images": len(targets),
        "index_sha256": _sha256(folder / "index.json"),
        "chunks": [[c["filename"], c["chunk_bytes"], c["chunk_size"]] for c in index["chunks"]],
        "targets": targets,
    }


def summary_of(out: Path, manifest: dict) -> dict:
    splits = manifest["splits"].values()
    return {
        "out": str(out),
        "images": sum(s["images"] for s in splits),
        "shards": sum(len(s["chunks"]) for s in splits),
        "bytes": sum(c[1] for s in splits for c in s["chunks"]),
    }


# -- reading ------------------------------------------------------------------------------------------
class ShardSet:
    """An opened, checked shard set: its manifest, where each split is read from, and the cache."""

    def __init__(
        self, root: str, manifest: dict, cache: Path | None, cache_limit: int | None, cache_text=None
    ):
        self.root, self.manifest, self.cache, self.cache_limit = root, manifest, cache, cache_limit
        self.cache_text = cache_text  # the limit as the config wrote it

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def task(self) -> dict | None:
        return self.manifest.get("task")

    def source(self, split: str) -> str:
        return f"{self.root.rstrip('/')}/{split}"

    def dataset(self, split: str, transform, readers: int = 1) -> ShardImageDataset:
        """The split read through `transform`. With a cache limit, each of the `readers` loader processes of
        each split (they all run during fit) keeps a share of it: room for the chunk it reads and the one
        LitData fetches ahead, so each share must hold two chunks."""
        record = self.manifest["splits"][split]
        share = None
        if self.cache_limit is not None:
            share = self.cache_limit // (max(1, readers) * len(SPLITS))
            largest = max(c[1] for s in self.manifest["splits"].values() for c in s["chunks"])
            if share < 2 * largest:
                need = int(np.ceil(2 * largest * max(1, readers) * len(SPLITS) / 1e6))
                raise UserError(
                    f"data.cache_limit={self.cache_text} is too small for {self.root}: each of its {readers} loader "
                    f"process(es) per split ({len(SPLITS)} splits) needs room for 2 chunks of up to "
                    f"{largest / 1e6:.1f}MB. Fix: data.cache_limit={need}MB or more, or fewer data.num_workers"
                )
        cache = None if self.cache is None else self.cache / split
        return ShardImageDataset(self.source(split), record, transform, cache, share)


def _cache_folder(root: str, cache_dir) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE.expanduser()
    return base / hashlib.sha256(root.encode()).hexdigest()[:16]


def _fetch(root: str, name: str, into: Path) -> Path:
    """`<root>/<name>` of a remote root, downloaded into `into`; unreachable: a one-line UserError."""
    from litdata.streaming.downloader import get_downloader

    local = into / name
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.{os.getpid()}.tmp"
    try:
        get_downloader(root, str(into), []).download_file(f"{root.rstrip('/')}/{name}", str(tmp))
        os.replace(tmp, local)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UserError(
            f"cannot read {root.rstrip('/')}/{name} ({type(exc).__name__}: {first[:160]}). Fix: check the URL, the "
            "network and the credentials (e.g. AWS_PROFILE for s3://), or copy the shards to a local folder"
        ) from None
    return local


def open_shards(root: str, cache_dir=None, cache_limit=None) -> ShardSet:
    """The shard set at `root` (a folder or a URL), checked: a manifest of this format beside the index and
    chunks it records, every chunk present and whole (local roots), a cache limit of at least one chunk."""
    root = str(root)
    remote = is_remote(root)
    if remote:
        cache = _cache_folder(root, cache_dir)
        limit = parse_bytes(cache_limit) if cache_limit is not None else None
        manifest_file = _fetch(root, MANIFEST, cache)
    else:
        folder = Path(root).expanduser()
        root, cache, limit = str(folder), None, None
        if not folder.is_dir():
            raise UserError(
                f"data.root {folder} does not exist. Fix: data.root=<a folder written by visiontune-shard>"
            )
        manifest_file = folder / MANIFEST
        if not manifest_file.is_file():
            unfinished = (folder / PROGRESS).is_file()
            why = "an unfinished shard set (visiontune-shard was stopped)" if unfinished else "no shard set"
            raise UserError(
                f"data=shards: {folder} holds no {MANIFEST}: {why}. Fix: visiontune-shard data=<source> out={folder}"
            )
    try:
        manifest = json.loads(manifest_file.read_text())
        assert manifest.get("format") == FORMAT and set(manifest["splits"]) == set(SPLITS)
    except (ValueError, AssertionError, KeyError, TypeError):
        raise UserError(
            f"{root}/{MANIFEST} is not a visiontune shard manifest. Fix: rewrite it with visiontune-shard"
        ) from None
    for split in SPLITS:
        record = manifest["splits"][split]
        index = _fetch(root, f"{split}/index.json", cache) if remote else Path(root) / split / "index.json"
        chunks = json.loads(index.read_text())["chunks"] if index.is_file() else None
        listed = (
            None if chunks is None else [[c["filename"], c["chunk_bytes"], c["chunk_size"]] for c in chunks]
        )
        if chunks is None or _sha256(index) != record["index_sha256"] or listed != record["chunks"]:
            raise UserError(
                f"{root}/{MANIFEST} does not describe the shards beside it ({split}/index.json "
                f"{'is missing' if chunks is None else 'differs from the one it records'}): a manifest from another "
                "source. Fix: rewrite the shard set with visiontune-shard"
            )
        if not remote:
            for name, size, _ in record["chunks"]:
                path = Path(root) / split / name
                if not path.is_file():
                    raise UserError(
                        f"shard chunk {path} is missing. Fix: rewrite the shard set with visiontune-shard"
                    )
                if path.stat().st_size != size:
                    raise UserError(
                        f"shard chunk {path} is truncated ({path.stat().st_size} of {size} bytes). Fix: rewrite the "
                        "shard set with visiontune-shard"
                    )
    if limit is not None:
        largest = max(c[1] for s in manifest["splits"].values() for c in s["chunks"])
        if limit < largest:
            raise UserError(
                f"data.cache_limit={cache_limit} is smaller than one chunk of {root} ({largest / 1e6:.1f}MB). Fix: "
                f"data.cache_limit={int(np.ceil(2 * len(SPLITS) * largest / 1e6))}MB or more (2 chunks for each "
                "loader process of each split)"
            )
    return ShardSet(root, manifest, cache, limit, cache_limit)


class ShardImageDataset(Dataset):
    """One split of a shard set: (transformed image, target) by index, like the file datasets.

    `labels` (one class per image) or `targets` (task heads) come from the manifest, so class counts,
    balancing and splits need no read. `groups` is the number of images of each chunk, in index order:
    the sampler reads chunk by chunk. A remote split is read into `cache/<rank>-<worker>/`, which keeps
    at most `share` bytes of chunks.
    """

    def __init__(self, source: str, record: dict, transform, cache: Path | None, share: int | None):
        self.source, self.transform, self.cache, self.share = source, transform, cache, share
        targets = record["targets"]
        if targets and isinstance(targets[0], dict):
            self.targets = [_stored_target(t) for t in targets]
        else:
            self.labels = np.asarray(targets, dtype=np.int64)
        self.fingerprint = record["index_sha256"]
        self.groups = [c[2] for c in record["chunks"]]
        self._starts = np.cumsum([0, *self.groups]).tolist()
        self._names = [c[0] for c in record["chunks"]]
        self.chunk_bytes = [c[1] for c in record["chunks"]]
        self._store = None
        self._recent: list[str] = []  # chunk files of this reader, least recently read first

    def __getstate__(self):
        return {**self.__dict__, "_store": None, "_recent": []}

    def __len__(self) -> int:
        return self._starts[-1]

    def target(self, i: int):
        if hasattr(self, "targets"):
            return {k: torch.as_tensor(v) for k, v in self.targets[i].items()}
        return int(self.labels[i])

    def _reader(self):
        if self._store is None:
            from litdata import StreamingDataset
            from litdata.streaming.resolver import Dir

            source = self.source
            if self.cache is not None:
                worker = torch.utils.data.get_worker_info()
                who = f"rank{os.environ.get('LOCAL_RANK', '0')}-{'main' if worker is None else f'worker{worker.id}'}"
                self._folder = self.cache / who
                self._folder.mkdir(parents=True, exist_ok=True)
                source = Dir(path=str(self._folder), url=self.source)
            # batch_decode=0: one item decoded per read (LitData's default decodes windows of 256 items, for
            # in-order reads; the sampler reads a chunk in shuffled order: 6.6 ms an image instead of 0.02)
            self._store = StreamingDataset(source, max_pre_download=1, batch_decode=0)
        return self._store

    def raw(self, i: int) -> torch.Tensor:
        """Item i's stored uint8 image (3, S, S), before any transform."""
        item = self._reader()[int(i)]
        if self.cache is not None:
            self._evict(self._names[bisect.bisect_right(self._starts, int(i)) - 1])
        image = torch.from_numpy(np.ascontiguousarray(item["image"]))
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image

    def __getitem__(self, i: int):
        image = self.raw(i)
        return (self.transform(image) if self.transform else image), self.target(i)

    def _evict(self, current: str) -> None:
        """Keep this reader's chunks within its share: drop the least recently read ones but `current`."""
        if self._recent and self._recent[-1] == current:
            return
        if current in self._recent:
            self._recent.remove(current)
        self._recent.append(current)
        present = {p.name: p.stat().st_size for p in self._folder.glob("*.bin") if p.is_file()}
        total = sum(present.values())
        keep = self.share - max(self.chunk_bytes)  # room for the chunk LitData fetches ahead
        # only chunks read already: one LitData is still fetching ahead is left alone
        for name in [n for n in self._recent[:-1] if n in present]:
            if total <= keep:
                break
            (self._folder / name).unlink(missing_ok=True)
            total -= present[name]
            self._recent.remove(name)


def source_bytes(datamodule) -> int:
    """The size of the files a datamodule's splits read (0 for in-memory data), for the writer's summary."""
    paths = set()
    for split in SPLITS:
        paths.update(getattr(getattr(datamodule, f"{split}_set"), "paths", []))
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            pass
    return total
