"""How well a frozen backbone's features suit a labelled dataset, before any fine-tuning.

`visiontune-rank` runs each candidate backbone once over a subset of the data (through the frozen-feature
cache, `training/features.py`, so a second ranking reads the features instead of computing them), then
scores the features two ways:

- **LogME** (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
  ICML 2021): the log marginal likelihood (evidence) of a Bayesian linear model from the features to the
  labels, per sample, maximised over its two precisions, with each class's one-vs-rest indicator as a
  target and the mean over classes as the score. It needs no held-out data and no training.
- **k-NN accuracy**: cosine-similarity k nearest neighbours from the train part on the held-out part.

Both are pure numpy functions of (features, labels).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

LOGME_TOL = 1e-8  # relative change of alpha / beta at which the fixed point counts as reached
LOGME_MAX_ITER = 1000


def logme_evidence(u: np.ndarray, sigma: np.ndarray, y: np.ndarray, dim: int) -> tuple[float, float, float]:
    """The maximised evidence per sample of y ~ N(F w, 1/beta), w ~ N(0, 1/alpha), for one target.

    `u` (n, k) and `sigma` (k,) come from the thin SVD F = U S V^T (sigma = s^2), `dim` is F's number of
    columns. In that basis every quantity of MacKay's fixed-point update is a sum over k values, so an
    iteration costs O(k) after the one SVD (the SVD trick). Returns (evidence / n, alpha, beta).
    """
    n = len(y)
    z2 = (u.T @ y) ** 2  # y's energy along each singular direction
    outside = max(float(y @ y - z2.sum()), 0.0)  # the part of y no weight can reach
    alpha, beta = 1.0, 1.0
    for _ in range(LOGME_MAX_ITER):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())  # the effective number of parameters
        m2 = float((sigma * z2 / (sigma + t) ** 2).sum())  # |m|^2 of the posterior mean m
        res2 = float((z2 * (t / (sigma + t)) ** 2).sum()) + outside  # |F m - y|^2
        new_alpha, new_beta = gamma / (m2 + 1e-12), (n - gamma) / (res2 + 1e-12)
        done = abs(new_alpha - alpha) <= LOGME_TOL * alpha and abs(new_beta - beta) <= LOGME_TOL * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    t = alpha / beta
    m2 = float((sigma * z2 / (sigma + t) ** 2).sum())
    res2 = float((z2 * (t / (sigma + t)) ** 2).sum()) + outside
    # log|A| with A = alpha I + beta F^T F: k directions with sigma, dim - k directions with 0
    logdet = float(np.log(alpha + beta * sigma).sum()) + (dim - len(sigma)) * math.log(alpha)
    evidence = (
        dim / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - beta / 2 * res2
        - alpha / 2 * m2
        - logdet / 2
        - n / 2 * math.log(2 * math.pi)
    )
    return evidence / n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of features (n, d) for integer labels (n,): the mean over classes of the one-vs-rest evidence."""
    f = np.asarray(features, dtype=np.float64)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    labels = np.asarray(labels)
    scores = [
        logme_evidence(u, sigma, (labels == c).astype(np.float64), f.shape[1])[0] for c in np.unique(labels)
    ]
    return float(np.mean(scores))


def knn_accuracy(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, k: int = 20
) -> float:
    """Accuracy on `test` of a k-nearest-neighbour vote (cosine similarity) over `train`; ties go to
    the class whose neighbours are closer."""
    a = _unit(train)
    b = _unit(test)
    k = min(int(k), len(a))
    classes, codes = np.unique(train_labels, return_inverse=True)
    correct = 0
    for start in range(0, len(b), 1024):
        sims = b[start : start + 1024] @ a.T
        near = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(sims), len(classes)))
        rows = np.repeat(np.arange(len(sims)), k)
        np.add.at(votes, (rows, codes[near].ravel()), 1.0 + 1e-3 * np.take_along_axis(sims, near, 1).ravel())
        correct += int((classes[votes.argmax(1)] == test_labels[start : start + 1024]).sum())
    return correct / max(len(b), 1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- the ranking's files

COLUMNS = ("rank", "candidate", "logme", "knn_acc", "features", "train_images", "heldout_images", "seconds",
           "cached")  # fmt: skip


def write_ranking(rows: list[dict], run_dir: Path, k: int) -> tuple[Path, Path]:
    """ranking.csv (one row per ranked candidate, best LogME first) and ranking.png (the two scores as
    bars) in run_dir."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    csv_path, png_path = Path(run_dir) / "ranking.csv", Path(run_dir) / "ranking.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: row[c] for c in COLUMNS} for row in rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["candidate"] for row in rows][::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 1.5), sharey=True)
    axes[0].barh(names, [row["logme"] for row in rows][::-1], color="tab:blue")
    axes[0].set_xlabel("LogME (higher transfers better)")
    axes[1].barh(names, [row["knn_acc"] for row in rows][::-1], color="tab:orange")
    axes[1].set_xlabel(f"{k}-NN accuracy on the held-out images")
    axes[1].set_xlim(0, 1)
    fig.suptitle("Backbones ranked before fine-tuning (frozen features)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path
