"""Accuracy under common corruptions: `eval robustness=true` re-tests a checkpoint's test split under
every corruption of corruptions.py at severities 1..5.

A corruption must hit the image as a camera would, before normalisation, at the size the model sees.
So the split's eval transform is cut in two (transforms.eval_geometry, then transforms.normalise):
a stratified subset of the test split goes through the geometry once (decode, RGB, resize / crop)
and is held in memory as uint8; each of the 50 passes then corrupts it in batches, normalises and
classifies it. The clean pass takes the same path without a corruption, so it equals the plain test
accuracy on that subset. Memory: subset x 3 x size^2 bytes (2000 images at 64 px: 25 MB).

A grey source (Fashion-MNIST: three equal channels after RGB expansion) is corrupted on one channel
and expanded again, so its noise stays grey, as in MNIST-C.

Into the run dir: robustness.csv (corruption, severity, accuracy; a `clean` row with severity 0 first)
and robustness.png; metrics gain robust/clean_acc, robust/mean_acc (over all corruption x severity),
robust/<corruption> (its mean over the severities) and robust/images. With eval adapt=bn|tent every
cell is measured once more through the adapter, reset per cell: a column accuracy_<method> and the
same metrics under robust/<method>/ (robust/bn/mean_acc, ...).
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from visiontune.data.splits import stratified_subset
from visiontune.data.transforms import eval_geometry, normalise
from visiontune.deploy.session import InferenceSession, indexed_loader
from visiontune.errors import UserError
from visiontune.evaluation.corruptions import CORRUPTIONS, SEVERITIES, corrupt_indexed

log = logging.getLogger("visiontune")
COLUMNS = ("corruption", "severity", "accuracy")
CLEAN = "clean"


def subset_indices(labels, n: int | None, seed: int) -> np.ndarray:
    """A seeded, stratified subset of `n` test indices (all of them when n is None or not smaller)."""
    labels = np.asarray(labels)
    return np.arange(len(labels)) if n is None else stratified_subset(labels, int(n), seed)


def pre_normalised(dataset, datamodule):
    """The same items as `dataset` (a split built by the DataModule), through the eval transform up to
    normalisation: uint8 RGB (3, size, size) images."""
    if not hasattr(dataset, "transform"):
        raise TypeError(f"a {type(dataset).__name__} has no transform to stop before normalisation")
    view = copy.copy(dataset)
    view.transform = eval_geometry(datamodule.image_size, datamodule.interpolation, datamodule.crop_pct)
    return view


def load_images(dataset, keep: np.ndarray, like) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 images (M, 3, H, W), labels (M,), dataset indices (M,)) of the readable items in `keep`."""
    images, labels, indices = [], [], []
    for batch in indexed_loader(Subset(dataset, keep.tolist()), like=like):
        if batch is None:  # every item of the batch was unreadable
            continue
        position, x, y = batch
        images.append(torch.as_tensor(x))
        labels.append(y)
        indices.append(torch.as_tensor(keep)[position])
    if not images:
        raise UserError("no readable images in the test split. Fix: check data.root and the files in it")
    return torch.cat(images), torch.cat(labels).long(), torch.cat(indices).long()


def is_grey(images: torch.Tensor) -> bool:
    return images.shape[1] == 3 and bool((images == images[:, :1]).all())


def corrupt_split(x: torch.Tensor, indices, name: str, severity: int, seed: int, grey: bool) -> torch.Tensor:
    """A uint8 batch (N, 3, H, W) under a corruption, image by image seeded from (seed, dataset index);
    `grey` images (three equal channels) are corrupted on one channel and expanded back."""
    if not grey:
        return corrupt_indexed(x, indices, name, severity, seed)
    return corrupt_indexed(x[:, :1], indices, name, severity, seed).expand(-1, 3, -1, -1).contiguous()


def accuracy(
    session: InferenceSession,
    images,
    labels,
    indices,
    finish,
    batch_size: int,
    corruption=None,
    seed: int = 0,
) -> float:
    """Top-1 accuracy of the session's model on uint8 `images` under (name, severity) `corruption`
    (None = clean), normalised by `finish`."""
    grey = is_grey(images)
    if session.adapter is not None:  # the adapter's order (a seeded shuffle); accuracy does not depend on it
        order = session.adapter.order(len(images))
        images, labels, indices = images[order], labels[order], indices[order]
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        if corruption is not None:
            x = corrupt_split(x, indices[start : start + batch_size], *corruption, seed, grey)
        logits = session.logits(finish(x))
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def run_robustness(
    session: InferenceSession, subset: int | None, seed: int, run_dir: Path, like=None, adapters=None
) -> dict:
    """Test a checkpoint's session on a `subset` of its data's test split, clean and under every
    corruption and severity; write robustness.csv and robustness.png into `run_dir`; return the
    robust/* metrics.

    `adapters` ({method: evaluation.adapt.Adapter}): each cell is measured with the trained model and
    again through each adapter, reset before every cell (each corruption and severity is a domain of its
    own): robustness.csv gains a column `accuracy_<method>`, the metrics robust/<method>/*."""
    adapters = dict(adapters or {})
    plain = session.adapter
    datamodule = session.datamodule
    datamodule.setup("test")
    test_set = datamodule.test_set
    keep = subset_indices(test_set.labels, subset, seed)
    images, labels, indices = load_images(pre_normalised(test_set, datamodule), keep, like)
    finish = normalise(datamodule.mean, datamodule.std)
    batch_size = like.batch_size if like is not None else int(datamodule.cfg.get("batch_size") or 64)

    def measure(corruption=None) -> dict:
        """{"accuracy": the trained model's, "accuracy_<method>": each adapter's} on one cell."""
        result = {}
        for method, adapter in {"": None, **adapters}.items():
            session.adapter = adapter
            if adapter is not None:
                adapter.reset()
            column = f"accuracy_{method}" if method else "accuracy"
            result[column] = accuracy(session, images, labels, indices, finish, batch_size, corruption, seed)
        session.adapter = plain
        return result

    log.info(
        "robustness: %d test images x %d corruptions x %d severities (robustness_subset=%s)",
        len(images), len(CORRUPTIONS), len(SEVERITIES), subset,
    )  # fmt: skip
    if adapters:
        log.info("robustness: each cell also with adapt=%s, reset per cell", ",".join(adapters))
    rows = [{"corruption": CLEAN, "severity": 0, **measure()}]
    clean = rows[0]["accuracy"]
    for number, name in enumerate(CORRUPTIONS, 1):
        started = time.perf_counter()
        cells = [{"corruption": name, "severity": s, **measure((name, s))} for s in SEVERITIES]
        rows += cells
        shown = " ".join(
            f"{r['accuracy']:.4f}" + "".join(f"/{r[f'accuracy_{m}']:.4f}" for m in adapters) for r in cells
        )
        log.info(
            "robustness %d/%d %-15s %s (clean %.4f, %.1f s)",
            number, len(CORRUPTIONS), name, shown, clean, time.perf_counter() - started,
        )  # fmt: skip
    write_csv(rows, run_dir / "robustness.csv")
    plot_robustness(rows, run_dir / "robustness.png")
    metrics = summary(rows, len(images))
    for method in adapters:
        column = [{**r, "accuracy": r[f"accuracy_{method}"]} for r in rows]
        metrics.update(
            {k.replace("robust/", f"robust/{method}/", 1): v for k, v in summary(column, len(images)).items()
             if k != "robust/images"}
        )  # fmt: skip
    return metrics


def summary(rows: list[dict], images: int) -> dict:
    """robust/clean_acc, robust/mean_acc (over every corruption x severity), robust/<name>, robust/images."""
    corrupted = [r for r in rows if r["corruption"] != CLEAN]
    metrics = {
        "robust/clean_acc": next(r["accuracy"] for r in rows if r["corruption"] == CLEAN),
        "robust/mean_acc": float(np.mean([r["accuracy"] for r in corrupted])),
        "robust/images": images,
    }
    for name in dict.fromkeys(r["corruption"] for r in corrupted):
        metrics[f"robust/{name}"] = float(
            np.mean([r["accuracy"] for r in corrupted if r["corruption"] == name])
        )
    return metrics


def write_csv(rows: list[dict], path: Path) -> None:
    """Written to a temporary name, then renamed: a failure leaves no half-written table."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        adapted = [k for k in rows[0] if k not in COLUMNS]  # accuracy_<method>, one per adapter
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *adapted])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if k.startswith("accuracy") else v for k, v in row.items()})
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [
            {"corruption": r["corruption"], "severity": int(r["severity"]), "accuracy": float(r["accuracy"])}
            for r in csv.DictReader(f)
        ]


def plot_robustness(rows: list[dict], path: Path) -> None:
    """Accuracy against severity, one line per corruption, the clean accuracy dashed; then renamed."""
    from visiontune.evaluation.report import _pyplot

    plt = _pyplot()
    clean = next(r["accuracy"] for r in rows if r["corruption"] == CLEAN)
    names = list(dict.fromkeys(r["corruption"] for r in rows if r["corruption"] != CLEAN))
    mean = float(np.mean([r["accuracy"] for r in rows if r["corruption"] != CLEAN]))
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        points = sorted((r["severity"], r["accuracy"]) for r in rows if r["corruption"] == name)
        ax.plot(*zip(*points, strict=True), marker="o", color=colors(i % 10), label=name)
    ax.axhline(clean, color="black", linestyle="--", linewidth=1, label=f"clean ({clean:.3f})")
    ax.set(xlabel="severity", ylabel="accuracy", xticks=list(SEVERITIES), ylim=(0, 1.02),
           title=f"accuracy under common corruptions (mean {mean:.3f})")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
