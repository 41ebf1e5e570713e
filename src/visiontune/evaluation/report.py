"""The evaluation report: per-class table, confusion matrix, reliability diagram, mistakes grid, report.md.

The tables are pure functions of the confusion matrix (rows = true class, columns = predicted), so
the tests can check them against a direct count; the figures use matplotlib's Agg backend.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

PER_CLASS_COLUMNS = ("class", "support", "precision", "recall", "f1", "confused_with", "confused_count")


def confusion_matrix(predicted: torch.Tensor, targets: torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: [i, j] = images of true class i predicted as j (torchmetrics' layout)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(predicted.long(), targets.long(), num_classes).numpy().astype(np.int64)


def per_class_rows(cm: np.ndarray, class_names: list[str]) -> list[dict]:
    """One row per class: support, precision, recall, F1 (0 where undefined) and the class it is most
    often mistaken for (the largest off-diagonal count of its row; empty when it is never mistaken)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    off = cm.copy()
    np.fill_diagonal(off, -1)
    rows = []
    for i, name in enumerate(class_names):
        j = int(off[i].argmax())
        mistaken = int(off[i, j]) > 0
        rows.append(
            {
                "class": name,
                "support": int(support[i]),
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "confused_with": class_names[j] if mistaken else "",
                "confused_count": int(off[i, j]) if mistaken else 0,
            }
        )
    return rows


def top_confusions(cm: np.ndarray, class_names: list[str], k: int = 5) -> list[tuple[str, str, int]]:
    """The k largest off-diagonal cells as (true, predicted, count), largest first, zeros left out."""
    off = np.asarray(cm, dtype=np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = off.ravel()
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:k]  # ties: the first cell first
    pairs = [np.unravel_index(i, off.shape) for i in order]
    return [(class_names[i], class_names[j], int(off[i, j])) for i, j in pairs if off[i, j] > 0]


def most_confident_mistakes(probs: torch.Tensor, targets: torch.Tensor, n: int) -> list[int]:
    """Indices of the n wrong predictions with the highest confidence, most confident first."""
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != targets).flatten()
    order = torch.argsort(confidence[wrong], descending=True, stable=True)
    return wrong[order][:n].tolist()


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    """A table as CSV: a header of `columns`, then a line per row; floats to 4 decimals, NaN left empty."""

    def cell(value):
        if not isinstance(value, float):
            return value
        return "" if math.isnan(value) else f"{value:.4f}"

    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:  # names as their bytes
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: cell(v) for k, v in row.items()} for row in rows)


def write_per_class_csv(rows: list[dict], path: Path) -> None:
    write_csv(rows, path, PER_CLASS_COLUMNS)


# -- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> None:
    """Counts (left) and row-normalised recall (right), class names on both axes.

    The figure grows with the number of classes (about 0.2 inch a class), and cell numbers are drawn
    only while they fit (up to 20 classes), so 100 classes stay readable.
    """
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.int64)
    n = len(class_names)
    rows = cm.sum(1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = max(5.0, 0.2 * n + 2.5)
    font = 9 if n <= 20 else max(4, int(9 - n / 20))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side), constrained_layout=True)
    for ax, values, title, fmt in (
        (axes[0], cm, "counts", "d"),
        (axes[1], normalised, "row-normalised (recall)", ".2f"),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=values.max() if values.max() > 0 else 1)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(f"confusion matrix, {title}")
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=font)
        ax.set_yticks(range(n), class_names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if n <= 20:
            threshold = values.max() / 2 if values.max() > 0 else 1
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=font - 1,
                            color="white" if values[i, j] > threshold else "black")  # fmt: skip
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(panels: list[tuple[str, dict, float]], path: Path) -> None:
    """One reliability diagram per (title, reliability_bins(...), ece): accuracy per confidence bin
    against the diagonal, the gap shaded, and the share of images per bin underneath."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        2,
        len(panels),
        figsize=(5 * len(panels), 6),
        squeeze=False,
        height_ratios=[3, 1],
        constrained_layout=True,
    )
    for col, (title, bins, ece) in enumerate(panels):
        n_bins = len(bins["lower"])
        width = 1.0 / n_bins
        left = np.asarray(bins["lower"])
        count = np.asarray(bins["count"], dtype=np.float64)
        has = count > 0
        acc, conf = np.asarray(bins["accuracy"]), np.asarray(bins["confidence"])
        ax = axes[0, col]
        ax.bar(
            left[has],
            acc[has],
            width=width,
            align="edge",
            color="tab:blue",
            edgecolor="black",
            label="accuracy",
        )
        ax.bar(left[has], (conf - acc)[has], bottom=acc[has], width=width, align="edge", facecolor="none",
               edgecolor="tab:red", hatch="///", linewidth=0.8, label="gap to mean confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}: ECE {ece:.4f}")
        ax.legend(loc="upper left", fontsize=8)
        share = count / max(count.sum(), 1)
        axes[1, col].bar(left, share, width=width, align="edge", color="gray", edgecolor="black")
        axes[1, col].set(xlim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="share of images")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mistakes(images: list[np.ndarray], captions: list[str], path: Path, columns: int = 6) -> None:
    """A grid of images (H, W, 3 floats in [0, 1]) with a caption each; a note when there are none."""
    plt = _pyplot()
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        ax.set_title(caption, fontsize=8)
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "no mistakes on the test split", ha="center", va="center")
    fig.suptitle("most confidently wrong test images (true / predicted, probability)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def denormalise(image: torch.Tensor, mean, std) -> np.ndarray:
    """A normalised CHW tensor back to an (H, W, 3) float array in [0, 1] for display."""
    x = image.float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


# -- report.md
def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report_md(
    path: Path,
    metrics: dict,
    rows: list[dict],
    confusions: list[tuple[str, str, int]],
    calibration: dict | None,
    ckpt_path: str,
) -> None:
    """report.md: the headline metrics, links to the files beside it, and what they say."""
    worst = sorted(rows, key=lambda r: (r["recall"], r["class"]))[:3]
    lines = [
        *_report_head(ckpt_path, metrics),
        "Files: [metrics.json](metrics.json), [per_class.csv](per_class.csv), "
        "[confusion_matrix.png](confusion_matrix.png), [reliability.png](reliability.png), "
        "[mistakes.png](mistakes.png).",
        "",
        "## Summary",
        "",
        f"- Test accuracy {metrics['test/acc']:.4f}, macro F1 {metrics['test/macro_f1']:.4f} on "
        f"{sum(r['support'] for r in rows)} images in {len(rows)} classes.",
        "- Lowest recall: " + ", ".join(f"{r['class']} ({r['recall']:.3f})" for r in worst) + ".",
    ]
    if confusions:
        pairs = ", ".join(f"{t} -> {p} ({n})" for t, p, n in confusions)
        lines.append(f"- Most frequent confusions (true -> predicted): {pairs}.")
    lines.append(
        f"- Calibration: 15-bin ECE {metrics['test/ece']:.4f}, NLL {metrics['test/nll']:.4f}"
        f" at temperature {metrics.get('temperature', 1.0):.4g}."
    )
    if calibration:
        lines.append(
            f"- Temperature scaling (fitted on the validation split): T = {calibration['temperature']:.4f}; "
            f"validation NLL {calibration['val/nll_before']:.4f} -> {calibration['val/nll_after']:.4f}, "
            f"test ECE {calibration['test/ece_before']:.4f} -> {calibration['test/ece_after']:.4f}. "
            f"The calibrated checkpoint is [calibrated.ckpt](calibrated.ckpt)."
        )
    lines += [
        "",
        "## Confusion matrix",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        "## Reliability diagram",
        "",
        "![reliability diagram](reliability.png)",
        "",
        "## Most confident mistakes",
        "",
        "![mistakes](mistakes.png)",
        "",
        "## Per class",
        "",
        per_class_markdown(rows),
        "",
    ]
    path.write_text("\n".join(lines))


def per_class_markdown(rows: list[dict]) -> str:
    head = "| class | support | precision | recall | F1 | most confused with |\n|---|---:|---:|---:|---:|---|"
    body = [
        f"| {r['class']} | {r['support']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
        + (f"{r['confused_with']} ({r['confused_count']}) |" if r["confused_with"] else "- |")
        for r in rows
    ]
    return "\n".join([head, *body])


# -- multilabel and multitask checkpoints (task=multilabel|multitask): a table per head and label
PER_LABEL_COLUMNS = ("head", "label", "support", "ap", "threshold", "precision", "recall", "f1")


def label_counts(decided: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F1) per column of 0/1 arrays (N, C), 0 where undefined."""
    tp = (decided & truth).sum(0).astype(np.float64)
    predicted, support = decided.sum(0), truth.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    return precision, recall, np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)


def per_label_rows(probs: torch.Tensor, targets: dict, heads: list, thresholds: torch.Tensor) -> list[dict]:
    """One row per class of a multiclass head (precision, recall, F1 of the argmax) and per label of a
    multilabel head (also AP and the threshold); images without the head's label are left out."""
    from visiontune.models.heads import MISSING
    from visiontune.training.tasks import average_precisions

    rows = []
    for h in heads:
        p, t = probs[:, h.start : h.stop].float(), targets[h.name]
        if h.kind == "multiclass":
            known = t.long() != MISSING
            cm = confusion_matrix(p[known].argmax(1), t.long()[known], len(h.classes))
            for r in per_class_rows(cm, list(h.classes)):
                rows.append({"head": h.name, "label": r["class"], "support": r["support"], "ap": math.nan,
                             "threshold": math.nan, "precision": r["precision"], "recall": r["recall"], "f1": r["f1"]})  # fmt: skip
            continue
        known = (t != MISSING).all(1)
        p, t = p[known], t[known]
        thr = thresholds[h.start : h.stop].cpu()
        decided, truth = (p >= thr).numpy(), (t == 1).numpy()
        precision, recall, f1 = label_counts(decided, truth)
        ap = average_precisions(p, t).tolist()
        for j, label in enumerate(h.classes):
            rows.append({"head": h.name, "label": label, "support": int(truth[:, j].sum()), "ap": float(ap[j]),
                         "threshold": float(thr[j]), "precision": float(precision[j]), "recall": float(recall[j]),
                         "f1": float(f1[j])})  # fmt: skip
    return rows


def write_per_label_csv(rows: list[dict], path: Path) -> None:
    write_csv(rows, path, PER_LABEL_COLUMNS)


def write_task_report_md(path: Path, metrics: dict, rows: list[dict], ckpt_path: str) -> None:
    """report.md of a multilabel or multitask checkpoint: the headline metrics and the per-label table."""
    headline = {k: v for k, v in metrics.items() if "/ap/" not in k}  # per-label APs: in the table below
    lines = [
        *_report_head(ckpt_path, headline),
        "Files: [metrics.json](metrics.json), [per_label.csv](per_label.csv).",
        "",
        "## Per head and label",
        "",
        "| head | label | support | AP | threshold | precision | recall | F1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['head']} | {r['label']} | {r['support']} | {_cell(r['ap'])} | {_cell(r['threshold'])} | "
          f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |" for r in rows],
        "",
    ]  # fmt: skip
    path.write_text("\n".join(lines))


def _report_head(ckpt_path: str, metrics: dict) -> list[str]:
    """report.md's title, the checkpoint, and a table of the numeric metrics (sorted by name)."""
    numeric = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, int | float)]
    return ["# Evaluation report", "", f"Checkpoint: `{ckpt_path}`", "", "| metric | value |", "|---|---|",
            *[f"| {k} | {_fmt(v)} |" for k, v in numeric], ""]  # fmt: skip


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"
