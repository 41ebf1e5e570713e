"""Ranking backbones before fine-tuning: LogME, the k-NN score, and `visiontune-rank` with its cache."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import compose_cfg

from visiontune.errors import UserError
from visiontune.evaluation.transferability import knn_accuracy, logme, logme_evidence


def direct_logme(f: np.ndarray, y: np.ndarray) -> float:
    """MacKay's evidence maximisation written out with full matrices (no SVD), and the evidence as the
    log density of y under its marginal N(0, I / beta + F F^T / alpha), per sample."""
    from scipy.stats import multivariate_normal

    n, d = f.shape
    eig = np.linalg.eigvalsh(f.T @ f).clip(min=0)
    alpha, beta = 1.0, 1.0
    for _ in range(2000):
        m = beta * np.linalg.solve(alpha * np.eye(d) + beta * f.T @ f, f.T @ y)
        gamma = (beta * eig / (alpha + beta * eig)).sum()
        alpha, beta = gamma / (m @ m), (n - gamma) / ((y - f @ m) @ (y - f @ m))
    cov = np.eye(n) / beta + f @ f.T / alpha
    return multivariate_normal(np.zeros(n), cov).logpdf(y) / n


@pytest.mark.parametrize("n,d", [(40, 6), (12, 20)])  # more samples than features, and fewer
def test_logme_matches_a_direct_evidence_maximisation(n, d):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    labels = rng.integers(0, 3, n)
    labels[:3] = [0, 1, 2]
    f[:, :3] += 1.5 * np.eye(3)[labels]  # each class's own signal, so that each evidence peaks inside
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    per_class = []
    for c in range(3):
        y = (labels == c).astype(float)
        fast, alpha, beta = logme_evidence(u, s**2, y, d)
        assert fast == pytest.approx(direct_logme(f, y), abs=1e-6)
        # a maximum: nudging either precision lowers the evidence
        for da, db in ((1.05, 1), (0.95, 1), (1, 1.05), (1, 0.95)):
            cov = np.eye(n) / (beta * db) + f @ f.T / (alpha * da)
            from scipy.stats import multivariate_normal

            assert multivariate_normal(np.zeros(n), cov).logpdf(y) / n < fast + 1e-7
        per_class.append(fast)
    assert logme(f, labels) == pytest.approx(np.mean(per_class))


def test_logme_and_knn_prefer_features_that_separate_the_classes():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 30)
    noise = rng.normal(size=(120, 16))
    good = noise + 4 * np.eye(16)[labels]  # each class along its own axis
    assert logme(good, labels) > logme(noise, labels)
    train, test = np.arange(120) % 3 != 0, np.arange(120) % 3 == 0
    assert knn_accuracy(good[train], labels[train], good[test], labels[test], k=5) == 1.0
    assert knn_accuracy(noise[train], labels[train], noise[test], labels[test], k=5) < 0.6


@pytest.fixture
def tiny_folder(tmp_path):
    """root/{train,val}/<class>/*.png: three classes of 8x8 images (dark, light, striped)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, count in (("train", 10), ("val", 4)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                base = [40, 200, 120][c] + rng.integers(-20, 20, (8, 8))
                if c == 2:
                    base[::2] = 20
                Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


def rank_cfg(root, tmp_path, run: str, candidates: str):
    overrides = ["data=imagefolder", f"data.root={root}", "data.image_size=32", "data.batch_size=16",
                 "data.num_workers=0", f"candidates={candidates}", "pretrained=false", "subset=30",
                 "heldout=12", "k=3", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    return compose_cfg(overrides, tmp_path / run, config_name="rank")


def test_rank_writes_the_table_and_the_chart_and_reads_the_cache_back(tiny_folder, tmp_path, capsys):
    from visiontune.backbones import rank

    candidates = "[timm:test_efficientnet,no_such_net,timm:test_resnet]"
    rows = rank(rank_cfg(tiny_folder, tmp_path, "first", candidates))
    out = capsys.readouterr().out
    assert "skipped no_such_net" in out and "estimate: about" in out
    assert [r["rank"] for r in rows] == [1, 2]
    with open(tmp_path / "first" / "ranking.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["candidate"] for r in table} == {
        "timm:test_efficientnet (random init)",
        "timm:test_resnet (random init)",
    }
    assert float(table[0]["logme"]) >= float(table[1]["logme"])
    assert all(r["train_images"] == "30" and r["heldout_images"] == "12" for r in table)
    assert (tmp_path / "first" / "ranking.png").stat().st_size > 0
    # the second call reads every candidate's features from the cache, and scores them the same
    again = rank(rank_cfg(tiny_folder, tmp_path, "second", "[timm:test_efficientnet,timm:test_resnet]"))
    assert all(r["cached"] for r in again) and "estimate" not in capsys.readouterr().out
    assert [(r["candidate"], r["logme"], r["knn_acc"]) for r in again] == [
        (r["candidate"], r["logme"], r["knn_acc"]) for r in rows
    ]


def test_rank_refuses_no_candidates_and_all_unbuildable_ones(tiny_folder, tmp_path):
    from visiontune.backbones import rank

    with pytest.raises(UserError, match="candidates is empty"):
        rank(rank_cfg(tiny_folder, tmp_path, "empty", "[]"))
    with pytest.raises(UserError, match="no candidate could be built"):
        rank(rank_cfg(tiny_folder, tmp_path, "none", "[no_such_net]"))
