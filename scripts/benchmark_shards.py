"""Shards against an image folder and data.cache=disk on Fashion-MNIST's training set: the time to write
each, its size on disk, and one pass of the training loader over it, side by side; print a markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_shards.py [--out DIR] [--keep] [--limit N]
        [--workers W] [--image-size 64] [--crop-pct 1.0] [--batch-size 256] [--eval-images 500] [--threads 1]
    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmark_shards.py --limit 3000   # a quick try

In one work folder (a new temporary folder, removed at the end unless --keep; or --out DIR, kept):

1. folder (PNG): the training images (all 60,000, or the first N with --limit) as grey PNG files in
   `folder/train/<class>/<i>.png` (PIL, one process), plus `--eval-images` images of the test set each in
   `folder/val/` and `folder/test/` (the next ones in `test/`), so that it is a data=imagefolder root with
   the whole training set as train. Reported: the seconds, and train/'s size (the sum of the file sizes
   and, as `du` counts it, the blocks allocated to its files and folders).
2. shards: `visiontune.data.shards.write_shards` over the datamodule `visiontune-shard data=imagefolder
   data.root=<folder> ...` builds (the shard config's seed and chunk_bytes), after its setup (the scan of
   the files, timed apart). Reported: write_shards' seconds (all three splits) and the train split's chunks.
3. data.cache=disk: `visiontune.data.cache.cache_decoded` on each split of that datamodule, as a run's
   setup calls it (into `<work>/cache`, not `<folder>/.cache`, so that the folder's size stays the PNG's).
   Reported: the seconds (all three splits) and the train split's arrays.
4. loader img/s: one full pass over `train_dataloader()` (EpochShuffleSampler, SeededSamples, the train
   transform of augment=none, batch 256, data.num_workers workers) of a fresh datamodule for (a) the folder,
   (b) the folder with data.cache=disk (the cache built in 3: a second run's loader) and (c) data=shards
   from the local shard folder, as the code reads them (LITDATA_* settings of the environment are unset).
   Timed: from the first batch to the end of the pass (images after the first batch / seconds); the
   datamodule's setup and the time to the first batch (worker start-up, the first reads) are columns of
   their own.

Every run's data settings are the ones of `make train` that apply to a folder: data.image_size=64 (or
--image-size) and data.crop_pct=1.0 (as data=fashion_mnist: a 28 px source is resized, not cropped), the
backbone's (efficientnet_lite0's) interpolation, mean and std, seed 42. Everything is read from a warm
page cache (each was just written), as a second epoch would: the figures are decoding, not disk reads.
The workers default to a run's data.num_workers=null (cores - 1, at most 8). This process runs with
--threads torch threads (default 1: it only collates what the workers send); each loader worker has one.
On shared or few cores, run it with OMP_NUM_THREADS=1 so that no library starts a thread per core.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from visiontune.build import build_datamodule
from visiontune.cli import CONF_DIR
from visiontune.data.cache import cache_decoded
from visiontune.data.shards import parse_bytes, write_shards
from visiontune.data.standard import FASHION_CLASSES, load_standard

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
# LitData settings of the environment that would change the "as the code reads them" pass
LITDATA_ENV = ("LITDATA_BATCH_DECODE", "LITDATA_BATCH_ROWS")


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train"):
    """The config `python -m visiontune.<config_name> <overrides>` would run with (tests/helpers.py's pattern)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


def write_png_folder(root: Path, limit: int | None, eval_images: int) -> dict[str, int]:
    """Fashion-MNIST train (its first `limit` images) as root/train/<class>/<i>.png; `eval_images` test-set
    images each as root/val/ and root/test/. Returns the number of images of each split."""
    x, y = load_standard("fashion_mnist", ROOT / "data", train=True)
    xt, yt = load_standard("fashion_mnist", ROOT / "data", train=False)
    n = len(y) if limit is None else min(limit, len(y))
    parts = {
        "train": (x, y, range(n)),
        "val": (xt, yt, range(eval_images)),
        "test": (xt, yt, range(eval_images, 2 * eval_images)),
    }
    for split, (images, labels, indices) in parts.items():
        folders = [root / split / name.replace("/", "-") for name in FASHION_CLASSES]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        for i in indices:
            Image.fromarray(images[i, 0].numpy()).save(folders[int(labels[i])] / f"{i}.png")
    return {split: len(indices) for split, (_, _, indices) in parts.items()}


def disk_usage(paths) -> tuple[int, int]:
    """(sum of the file sizes, bytes allocated as `du` counts them: files and folders) of files and trees."""
    size = allocated = 0
    for top in map(Path, paths):
        entries = [top] if top.is_file() else [top, *top.rglob("*")]
        for p in entries:
            st = p.lstat()
            allocated += st.st_blocks * 512
            if p.is_file():
                size += st.st_size
    return size, allocated


def loader_pass(datamodule) -> dict:
    """One pass over the training loader: time to the first batch, then images/s over the rest."""
    loader = datamodule.train_dataloader()
    start = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    t_first = time.perf_counter()
    images = 0
    for batch in batches:
        images += 0 if batch is None else len(batch[1])
    end = time.perf_counter()
    total = images + (0 if first is None else len(first[1]))
    workers = loader.num_workers
    del batches, loader
    gc.collect()  # persistent workers: gone with their iterator, before the next pass starts its own
    return {"images": total, "workers": workers, "first_batch_s": t_first - start, "pass_s": end - t_first,
            "img_s": images / (end - t_first)}  # fmt: skip


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default=None, help="the work folder (new or empty; kept); default a temporary one"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--limit", type=int, default=None, help="only the first N training images")
    ap.add_argument(
        "--workers", type=int, default=None, help="loader/decoder workers (default cores - 1, at most 8)"
    )
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--crop-pct", type=float, default=1.0)
    ap.add_argument("--eval-images", type=int, default=500, help="images of val/ and of test/ each")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", *LITDATA_ENV) if k in os.environ]
    print("command:", shlex.join([*env, sys.executable, *sys.argv]))
    for key in LITDATA_ENV:  # the "shards" row reads them as the code does
        if os.environ.pop(key, None) is not None:
            print(f"note: {key} is unset for this run")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    workers = args.workers if args.workers is not None else max(1, min(8, cores - 1))
    import litdata

    print(f"machine: {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads here), "
          f"litdata {litdata.__version__}, {workers} worker(s)", flush=True)  # fmt: skip

    if args.out:
        work = Path(args.out).expanduser()
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--out {work} is not empty: give a new or empty folder")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="vt-shards-bench-"))
    folder, shards, cache_dir = work / "folder", work / "shards", work / "cache"
    data = ["data=imagefolder", f"data.root={folder}", f"data.image_size={args.image_size}",
            f"data.crop_pct={args.crop_pct}", "augment=none", f"data.batch_size={args.batch_size}",
            f"data.num_workers={workers}"]  # fmt: skip
    began = time.perf_counter()
    try:
        # 1. the PNG folder
        t = time.perf_counter()
        counts = write_png_folder(folder, args.limit, args.eval_images)
        png_s = time.perf_counter() - t
        png_train = disk_usage([folder / "train"])
        png_all = disk_usage([folder])
        print(f"\n1. folder: {counts} PNG images in {png_s:.1f} s; train/ {mb(png_train[0])} MB of files, "
              f"{mb(png_train[1])} MB allocated (whole folder {mb(png_all[0])} / {mb(png_all[1])} MB)",
              flush=True)  # fmt: skip

        # 2. shards, as visiontune-shard writes them from that folder
        cfg = compose_cfg([*data, f"out={shards}"], work / "runs" / "shard", "shard")
        datamodule = build_datamodule(cfg)
        t = time.perf_counter()
        datamodule.setup("fit")
        scan_s = time.perf_counter() - t
        t = time.perf_counter()
        result = write_shards(datamodule, shards, int(cfg.seed), workers, parse_bytes(cfg.chunk_bytes), False)
        shard_s = time.perf_counter() - t
        chunks = sorted((shards / "train").glob("*.bin"))
        shard_train = disk_usage(chunks)
        shard_all = disk_usage([shards])
        print(f"2. shards: setup of data=imagefolder (scanning the files) {scan_s:.1f} s; write_shards "
              f"{shard_s:.1f} s (its own count {result['seconds']:.1f} s): {result['images']} images, "
              f"{result['shards']} chunks of chunk_bytes={cfg.chunk_bytes}, stored at "
              f"{datamodule.image_size} px; train: {len(chunks)} chunks, {mb(shard_train[0])} MB of files, "
              f"{mb(shard_train[1])} MB allocated (whole set {mb(shard_all[0])} / {mb(shard_all[1])} MB)",
              flush=True)  # fmt: skip

        # 3. data.cache=disk, split by split as ImageDataModule._cache_decoded builds it
        cache_s, cache_train = 0.0, (0, 0)
        for split in SPLITS:
            before = set(cache_dir.glob("*")) if cache_dir.exists() else set()
            t = time.perf_counter()
            cache_decoded(getattr(datamodule, f"{split}_set"), "disk", cache_dir, datamodule.image_size,
                          datamodule.crop_pct, datamodule.interpolation, workers)  # fmt: skip
            cache_s += time.perf_counter() - t
            if split == "train":
                cache_train = disk_usage(sorted(set(cache_dir.glob("*")) - before))
        cache_all = disk_usage([cache_dir])
        print(f"3. data.cache=disk: built in {cache_s:.1f} s; train {mb(cache_train[0])} MB of files, "
              f"{mb(cache_train[1])} MB allocated (all splits {mb(cache_all[0])} / {mb(cache_all[1])} MB)",
              flush=True)  # fmt: skip
        del datamodule
        gc.collect()

        # 4. one pass of each training loader
        shard_data = ["data=shards", f"data.root={shards}", "augment=none", f"data.batch_size={args.batch_size}",
                      f"data.num_workers={workers}"]  # fmt: skip
        runs = [
            ("folder (PNG)", data),
            ("data.cache=disk", [*data, "data.cache=disk", f"data.cache_dir={cache_dir}"]),
            # the shards' geometry comes from their manifest: data.image_size/crop_pct unset, as in a run
            ("shards", shard_data),
        ]
        passes = {}
        for i, (name, overrides) in enumerate(runs):
            dm = build_datamodule(compose_cfg(overrides, work / "runs" / f"loader{i}"))
            t = time.perf_counter()
            dm.setup("fit")
            setup_s = time.perf_counter() - t
            passes[name] = p = {"setup_s": setup_s, **loader_pass(dm)}
            print(f"4{'abc'[i]}. {name}: setup {setup_s:.1f} s, first batch after {p['first_batch_s']:.1f} s, "
                  f"then {p['images'] - min(p['images'], args.batch_size)} images in {p['pass_s']:.1f} s "
                  f"= {p['img_s']:.0f} img/s ({p['images']} images, {p['workers']} worker(s))",
                  flush=True)  # fmt: skip
            del dm
            gc.collect()

        written = {"folder (PNG)": (png_s, png_train), "data.cache=disk": (cache_s, cache_train),
                   "shards": (shard_s, shard_train)}  # fmt: skip
        n = counts["train"]
        print(f"\nFashion-MNIST train, {n} images ({'all' if n == 60000 else f'--limit {n}'}) + {counts['val']} val "
              f"+ {counts['test']} test; data.image_size={args.image_size} data.crop_pct={args.crop_pct} "
              f"augment=none, batch {args.batch_size}, {workers} worker(s); total {time.perf_counter() - began:.0f} s\n")  # fmt: skip
        print("| data | write/build s (all splits) | train size on disk MB (files) | train MB (allocated, du) "
              "| setup s | first batch s | loader img/s (train, from the first batch) |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, p in passes.items():
            seconds, (size, allocated) = written[name]
            print(f"| {name} | {seconds:.1f} | {mb(size)} | {mb(allocated)} | {p['setup_s']:.1f} | "
                  f"{p['first_batch_s']:.1f} | {p['img_s']:.0f} |")  # fmt: skip
        print(f"\nwrite/build s: the PNG files from the in-memory arrays (one process); write_shards, after the "
              f"folder's scan ({scan_s:.1f} s); the three cache_decoded calls. Sizes: train/ of the folder, the "
              "train split's chunk files, the train split's cache arrays. setup s: the loader's datamodule setup "
              "(the folder's scan; with the cache, also reading its checksum; the shards' manifest check).")  # fmt: skip
    finally:
        if args.out or args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
