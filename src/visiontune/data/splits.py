"""Seeded, stratified index splits: pure functions of the labels and the seed."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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


def shares(n: int, fractions: Sequence[float]) -> list[int]:
    """How many of a class's `n` samples each held-out part of `stratified_partition` takes, in order:
    its rounded share, and never the class's last sample (a class of one stays in train only); an
    earlier part is served first."""
    taken, left = [], n - 1
    for fraction in fractions:
        k = max(0, min(int(round(n * fraction)), left))
        taken.append(k)
        left -= k
    return taken


def held_out(n: int, val_fraction: float) -> int:
    """How many of a class's `n` samples `stratified_split` puts in val (see `shares`)."""
    return shares(n, [val_fraction])[0]


def smallest_class(fractions: Sequence[float], parts: Sequence[int] | None = None) -> int | None:
    """The fewest samples a class needs for `stratified_partition` to put one in each of `parts`
    (indices into `fractions`; default all); None when one of them has a fraction of 0."""
    parts = range(len(fractions)) if parts is None else parts
    if any(fractions[p] <= 0 for p in parts):
        return None
    return next(n for n in itertools.count(2) if all(shares(n, fractions)[p] >= 1 for p in parts))


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


def stratified_partition(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """[train, part 1, part 2, ...] indices. Each class's samples, shuffled by `seed`, are dealt out in
    order: the first `shares(n, fractions)[0]` to part 1, the next ones to part 2, ..., the rest to train,
    which keeps at least one of each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[np.empty(0, dtype=np.int64)] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for part, k in enumerate(shares(len(idx), fractions), start=1):
            parts[part].append(idx[start : start + k])
            start += k
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) for p in parts]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices; each class keeps at least one training sample (see `held_out`)."""
    train, val = stratified_partition(labels, [val_fraction], seed)
    return train, val


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
