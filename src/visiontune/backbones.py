"""The backbones visiontune can build: list them, and rank them for a dataset before fine-tuning.

`visiontune-backbones [NAME ...]` lists the backbones with their layer groups (`main`);
`visiontune-rank data=<option> candidates=[...]` scores each candidate's frozen features on a subset
of the data (`rank_main`, conf/rank.yaml; the scores are in `visiontune.evaluation.transferability`).
The backbones themselves are built in `visiontune.models.backbones`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from visiontune.cli import CONF_DIR, fail, plain, run_cli
from visiontune.config import validate_eval_config
from visiontune.errors import UserError, one_line
from visiontune.models.backbones import LITE_NAMES, TORCHVISION_NAMES, create_backbone, weights_status

log = logging.getLogger("visiontune")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="List the backbones visiontune can build.")
    parser.add_argument(
        "names", nargs="*", help="backbones to describe, with their layer groups (default: all)"
    )
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    import visiontune.training.checkpoints  # noqa: F401  (it reads the checkpoint of a ckpt: name)

    table = Table(title="visiontune backbones (top removed)")
    for col in ("name", "params", "features", "groups", "input", "pretrained weights here"):
        table.add_column(col)
    described = []
    for name in args.names or list(TORCHVISION_NAMES) + list(LITE_NAMES):
        try:
            backbone = create_backbone(name, pretrained=False)
            status = weights_status(name)
        except UserError as exc:
            fail(exc)
        params = sum(p.numel() for p in backbone.parameters())
        size = backbone.data_config["input_size"][-1]
        table.add_row(
            name,
            f"{params / 1e6:.1f}M",
            str(backbone.num_features),
            str(len(backbone.groups)),
            str(size),
            status,
        )
        described.append(backbone)
    console = Console(width=160)
    console.print(table)
    if args.names:  # the layer groups, which finetune.groups and finetune.pattern select from
        for backbone in described:
            console.print(
                f"{backbone.name} groups (input -> output): "
                + ", ".join(f"{i}:{g.name}" for i, g in enumerate(backbone.groups))
            )
    print(
        "Any timm model: timm:<name> (e.g. timm:resnet18, timm:convnext_nano); a local file: file:<path>@<arch>; "
        "a previous run's backbone: ckpt:<checkpoint or export folder>"
    )


# ---------------------------------------------------------------- visiontune-rank


def candidate_spec(item, default: bool = True) -> tuple[str, str, bool]:
    """(label, backbone name, pretrained) of one `candidates` entry: a backbone name (pretrained as
    `default` says), or `{backbone: <name>, pretrained: false}` for a random-init floor."""
    if isinstance(item, dict):
        if not isinstance(item.get("backbone"), str) or set(item) - {"backbone", "pretrained"}:
            raise UserError(
                f"candidates: {item} is not a backbone name nor {{backbone: <name>, pretrained: false}}"
            )
        name, pretrained = item["backbone"], bool(item.get("pretrained", True))
    elif isinstance(item, str) and item:
        name, pretrained = item, default
    else:
        raise UserError(f"candidates: {item!r} is not a backbone name")
    return (name if pretrained else f"{name} (random init)"), name, pretrained


def rank(cfg: DictConfig) -> list[dict]:
    """Score every candidate's frozen features on `subset` train images (LogME) and `heldout` val images
    (k-NN); write ranking.csv and ranking.png into the run dir; return the rows, best LogME first."""
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from visiontune.data import ImageDataModule
    from visiontune.data.cache import ArrayStore
    from visiontune.evaluation.transferability import knn_accuracy, logme, write_ranking
    from visiontune.training.features import cache_key, data_fingerprint, weights_hash

    validate_eval_config(cfg)  # the data keys, typed as for every command
    items = plain(cfg.candidates) if cfg.candidates is not None else []
    if not items:
        raise UserError(
            "candidates is empty: name the backbones to rank, e.g. candidates=[efficientnet_lite0,resnet18]"
        )
    specs = [candidate_spec(item, bool(cfg.pretrained)) for item in items]
    for key, low in (("subset", 2), ("heldout", 1), ("k", 1)):
        if not isinstance(cfg[key], int) or cfg[key] < low:
            raise UserError(f"{key}={cfg[key]}: it must be an integer of at least {low}")
    device = (
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else str(cfg.device).replace("auto", "cpu")
    )
    data = {**plain(cfg.data), "train_subset": cfg.subset, "val_subset": cfg.heldout}
    store = ArrayStore(cfg.cache_dir, "feature cache")
    run_dir = Path(cfg.paths.output_dir)
    console = Console(width=140)
    rows, skipped, per_image = [], [], None
    with Progress(console=console, transient=True) as progress:
        for done, (label, name, pretrained) in enumerate(specs):
            begin = time.perf_counter()
            torch.manual_seed(cfg.seed)  # a random init is the same in every call, so its features cache
            try:
                backbone = create_backbone(name, pretrained=pretrained).eval()
            except UserError as exc:
                print(f"skipped {label}: {one_line(exc, 200)}", flush=True)
                skipped.append(label)
                continue
            dm = ImageDataModule(data, {"name": "none"}, backbone.data_config, seed=cfg.seed)
            dm.setup("fit")
            weights, frozen = weights_hash(backbone), [g.name for g in backbone.groups]
            parts, cached = {}, True
            for part in ("train_set", "val_set"):
                dataset = getattr(dm, part)
                # the key a finetune=linear_probe run of this backbone uses: the two share the cache
                key = cache_key(name, weights, frozen, dataset.transform, data_fingerprint(dataset))
                features = store.load(key, np.float16)
                if features is None:
                    cached = False
                    if per_image is None:  # time a first batch: the estimate for every candidate still to run
                        per_image = _time_first_batch(backbone.to(device), dataset, int(cfg.data.batch_size))
                        left = sum(len(getattr(dm, p)) for p in ("train_set", "val_set")) * (
                            len(specs) - done
                        )
                        console.print(f"estimate: about {per_image * left:.0f} s for {len(specs) - done} candidate(s) "
                                      f"({per_image * 1000:.1f} ms per image, timed on {label}; cached ones are instant)")  # fmt: skip
                    features = _features(backbone.to(device), dataset, int(cfg.data.batch_size), progress,
                                         f"{label}: {part[:-4]}")  # fmt: skip
                    store.save(key, features)
                parts[part] = (features.astype(np.float64), np.asarray(dataset.labels))
            (xt, yt), (xv, yv) = (_readable(*parts[p]) for p in ("train_set", "val_set"))
            rows.append({
                "candidate": label, "logme": round(logme(xt, yt), 4),
                "knn_acc": round(knn_accuracy(xt, yt, xv, yv, cfg.k), 4), "features": xt.shape[1],
                "train_images": len(xt), "heldout_images": len(xv),
                "seconds": round(time.perf_counter() - begin, 1), "cached": cached,
            })  # fmt: skip
    if not rows:
        raise UserError(f"no candidate could be built ({', '.join(skipped)}): see the lines above")
    rows.sort(key=lambda r: -r["logme"])
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    csv_path, png_path = write_ranking(rows, run_dir, cfg.k)
    _print_ranking(console, rows, cfg.k)
    console.print(
        f"wrote {csv_path} and {png_path}" + (f"; skipped: {', '.join(skipped)}" if skipped else "")
    )
    return rows


def _time_first_batch(backbone, dataset, batch_size: int) -> float:
    """Seconds per image of the backbone on the first batch of `dataset` (after one warm-up image)."""
    import torch

    from visiontune.training.features import compute_features

    n = min(batch_size, len(dataset))
    compute_features(backbone, torch.utils.data.Subset(dataset, [0]), 1)
    begin = time.perf_counter()
    compute_features(backbone, torch.utils.data.Subset(dataset, range(n)), batch_size)
    return (time.perf_counter() - begin) / n


def _features(backbone, dataset, batch_size: int, progress, what: str) -> np.ndarray:
    """compute_features over `dataset` in chunks of a few batches, with a progress bar."""
    import torch

    from visiontune.training.features import compute_features

    step = batch_size * 4
    task = progress.add_task(what, total=len(dataset))
    chunks = []
    for start in range(0, len(dataset), step):
        part = torch.utils.data.Subset(dataset, range(start, min(start + step, len(dataset))))
        chunks.append(compute_features(backbone, part, batch_size))
        progress.advance(task, len(part))
    progress.remove_task(task)
    return np.concatenate(chunks)


def _readable(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of images that could be read (an unreadable file leaves a NaN row)."""
    keep = ~np.isnan(features).any(axis=1)
    return features[keep], labels[keep]


def _print_ranking(console, rows: list[dict], k: int) -> None:
    from rich.table import Table

    table = Table(title="backbones ranked by LogME (frozen features; higher transfers better)")
    for col in ("rank", "candidate", "LogME", f"{k}-NN acc", "features", "s", "cached"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["rank"]), r["candidate"], f"{r['logme']:.4f}", f"{r['knn_acc']:.3f}",
                      str(r["features"]), f"{r['seconds']:.1f}", "yes" if r["cached"] else "no")  # fmt: skip
    console.print(table)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="rank")
def rank_main(cfg: DictConfig) -> None:
    run_cli(rank, cfg)


if __name__ == "__main__":  # python -m visiontune.backbones [NAME ...] | rank <overrides> (= visiontune-rank)
    import sys

    if sys.argv[1:2] == ["rank"]:
        del sys.argv[1]
        rank_main()
    else:
        main()
