"""The data commands.

`visiontune-augment-preview [overrides] [--n N] [--out PATH]`: look at what the model will see.
Composes the train config with the same overrides as a training run, builds the ImageDataModule
exactly as `train()` does, and writes a PNG grid of N augmented training samples (batch-level MixUp /
CutMix included), un-normalised back to pixels.

`visiontune-shard data=<option> out=<folder>` (`shard_main`): write a dataset as LitData shards for
`data=shards` (visiontune.data.shards; config conf/shard.yaml).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from visiontune.cli import CONF_DIR, fail, run_cli
from visiontune.errors import UserError

GRID_COLUMNS = 8


def preview(overrides: list[str], n: int, out: Path) -> Path:
    """Write a grid of `n` augmented training samples of the run `overrides` describes to `out`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from torchvision.utils import make_grid, save_image

    from visiontune.build import build_datamodule
    from visiontune.cli import CONF_DIR, plain
    from visiontune.config import validate_config
    from visiontune.data.transforms import batch_mix

    if n < 1:
        raise UserError(f"--n {n}: ask for at least one sample")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if OmegaConf.is_interpolation(cfg.paths, "output_dir"):  # Hydra's run dir: there is none here
        cfg.paths.output_dir = str(out.parent)
    validate_config(cfg)  # a bad value is the same one line as visiontune-train's
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    dataset = datamodule.train_set
    torch.manual_seed(cfg.seed)
    order = torch.randperm(len(dataset)).tolist()
    samples = [s for s in (dataset[i] for i in order[: min(len(dataset), 2 * n)]) if s is not None][:n]
    images = torch.stack([image for image, _ in samples])
    columns = GRID_COLUMNS
    if images.ndim == 5:  # augment.jsd=true: one row per image (clean view, then its AugMix views)
        columns = images.shape[1]
        images = images.flatten(0, 1)
    mix = batch_mix(plain(cfg.augment), datamodule.num_classes)
    if mix is not None and len(samples) > 1:  # (task=multilabel|multitask labels are dicts: never mixed)
        images, _ = mix(images, torch.tensor([label for _, label in samples]))
    mean = torch.tensor(datamodule.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(datamodule.std, dtype=images.dtype).view(1, -1, 1, 1)
    images = (images * std + mean).clamp(0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow=min(len(images), columns)), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="visiontune-augment-preview",
        description="Write a PNG grid of augmented training samples. Other arguments are Hydra "
        "overrides, as for visiontune-train (e.g. augment=strong data.image_size=64).",
    )
    parser.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    parser.add_argument("--out", type=Path, default=Path("augment_preview.png"), help="the PNG to write")
    args, overrides = parser.parse_known_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        path = preview(overrides, args.n, args.out)
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        fail(exc)
    print(path)


def shard(cfg: DictConfig) -> dict:
    """visiontune-shard: write the shards of `cfg.data` into `cfg.out` (visiontune.data.shards.write_shards)
    and print the one-line summary."""
    import os

    from visiontune.build import build_datamodule
    from visiontune.data.shards import parse_bytes, source_bytes, write_shards

    if cfg.data.name == "shards":
        raise UserError(
            "visiontune-shard reads a dataset to shard: data=imagefolder|csv|<standard set>, not data=shards"
        )
    workers = cfg.num_workers if cfg.num_workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    datamodule = build_datamodule(cfg)
    result = write_shards(datamodule, Path(cfg.out), int(cfg.seed), int(workers), parse_bytes(cfg.chunk_bytes),
                          bool(cfg.overwrite))  # fmt: skip
    folder = source_bytes(datamodule)
    against = f" (the source files: {folder / 1e6:.1f} MB)" if folder else ""
    print(f"shards: {result['images']} images, {result['shards']} shards, {result['bytes'] / 1e6:.1f} MB{against}, "
          f"{result['seconds']:.1f} s -> {result['out']}" + (" (already written)" if result["skipped"] else ""))  # fmt: skip
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="shard")
def shard_main(cfg: DictConfig) -> None:
    run_cli(shard, cfg)


if (
    __name__ == "__main__"
):  # python -m visiontune.preview [--n N ...] | shard <overrides> (= visiontune-shard)
    import sys

    if sys.argv[1:2] == ["shard"]:
        del sys.argv[1]
        shard_main()
    else:
        main()
