"""Seeded, stratified index splits: pure functions of the labels and the seed."""

from __future__ import annotations

import numpy as np


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices whose class proportions match `labels` (largest remainder), seeded."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take))[: n - take.sum()]:
        take[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked))


def held_out(n: int, val_fraction: float) -> int:
    """How many of a class's `n` samples `stratified_split` puts in val: its rounded share, and never
    the class's last sample (a class of one stays in train only)."""
    return min(int(round(n * val_fraction)), n - 1)


def smallest_held_out(val_fraction: float) -> int | None:
    """The fewest samples a class needs for `stratified_split` to put one in val; None when none ever do."""
    if val_fraction <= 0:
        return None
    start = max(2, int(0.5 / val_fraction))  # the share rounds to 1 from just above 0.5 / val_fraction
    return next(n for n in range(start, start + 4) if held_out(n, val_fraction) >= 1)


def missing_classes(labels: np.ndarray, num_classes: int) -> list[int]:
    """The classes 0..num_classes-1 that have no sample in `labels`."""
    present = set(np.unique(np.asarray(labels, dtype=np.int64)).tolist())
    return [c for c in range(num_classes) if c not in present]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices; each class keeps at least one training sample (see `held_out`)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = held_out(len(idx), val_fraction)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_fold(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of fold `fold` of a seeded, stratified `folds`-fold split.

    Each class's shuffled indices are dealt round-robin into the folds, continuing from where the
    previous class stopped, so every fold gets each class's share and the fold sizes differ by at most 1.
    The K val sets partition the data.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 2 and 0 <= fold < folds")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    assigned = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        assigned[idx] = (np.arange(len(idx)) + dealt) % folds
        dealt += len(idx)
    return np.flatnonzero(assigned != fold), np.flatnonzero(assigned == fold)
