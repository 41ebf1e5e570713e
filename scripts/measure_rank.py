"""Do the ranking scores predict fine-tuning? And does a chained `ckpt:` backbone transfer better?

For each dataset (Fashion-MNIST, a 5k subset; scikit-learn's digits, all of it) this script
1. ranks the candidates with `visiontune-rank` (a fresh feature cache, timed), then
2. fine-tunes every candidate with the default strategy (finetune=full) on one small, equal budget,
3. prints each score against the test accuracy, with the Spearman correlation of LogME and of the
   k-NN accuracy with it, and the wall time of the ranking against that of the fine-tuning runs.
It also runs the chained-transfer comparison on digits at a 1-epoch budget (the 4-epoch one is
part of step 2): ImageNet Lite0 against Lite0 fine-tuned on Fashion-MNIST (`ckpt:`).

Every run goes to outputs/measure_rank/<dataset>/<candidate>/ and is skipped when its metrics.json
is there, so the script picks up where a killed run stopped.

    python scripts/measure_rank.py [--only digits|fashion_mnist|transfer] > outputs/measure_rank/log.txt 2>&1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "measure_rank"
FMNIST_CKPT = "outputs/compare_peft/full/checkpoints/best.ckpt"  # Lite0 fine-tuned on Fashion-MNIST, 90.7%
# (label, backbone, pretrained)
CANDIDATES = [
    ("lite0", "efficientnet_lite0", True),
    ("lite0_fmnist", f"ckpt:{FMNIST_CKPT}", True),
    ("lite1", "efficientnet_lite1", True),
    ("lite2", "efficientnet_lite2", True),
    ("lite0_random", "efficientnet_lite0", False),
    ("resnet18_random", "resnet18", False),
]
DATASETS = {
    # the data overrides shared by the ranking and the fine-tuning; then the fine-tuning's own budget
    "fashion_mnist": (
        ["data=fashion_mnist", "data.image_size=64"],
        ["data.train_subset=5000", "data.val_subset=1000", "data.test_subset=2000", "trainer.max_epochs=1"],
    ),
    "digits": (
        ["data=imagefolder", "data.root=data/digits", "data.image_size=64"],
        ["data.train_subset=null", "trainer.max_epochs=4"],
    ),
}
# the ranking's subsets: digits has 1,259 train and 269 val images in all
RANK = {"fashion_mnist": ["subset=1000", "heldout=500"], "digits": ["subset=2000", "heldout=500"]}


def python(*args: str, log: Path) -> float:
    """Run `python args...` from the repository root, its output into `log`; the wall seconds.

    One intra-op thread (OMP_NUM_THREADS=1): on 2 cores shared with other jobs, torch's 2 threads per
    process oversubscribe them, and a Lite0 forward pass ran 6x slower (13 against 75 images/s).
    """
    begin = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        print(f"FAILED ({done.returncode}): {' '.join(args)}; see {log}", flush=True)
    return time.perf_counter() - begin


def rank(dataset: str) -> tuple[dict, float]:
    """{label: ranking row} and the wall seconds of one ranking from an empty feature cache."""
    run = OUT / dataset / "rank"
    run.parent.mkdir(parents=True, exist_ok=True)
    if not (run / "ranking.csv").is_file():
        shutil.rmtree(OUT / dataset / "cache", ignore_errors=True)
        items = ",".join(f"'{b}'" if p else f"{{backbone:'{b}',pretrained:false}}" for _, b, p in CANDIDATES)
        seconds = python("-m", "visiontune.backbones", "rank", *DATASETS[dataset][0], *RANK[dataset], f"candidates=[{items}]",
                         f"cache_dir={OUT / dataset / 'cache'}", f"hydra.run.dir={run}", log=OUT / dataset / "rank.log")  # fmt: skip
        (run / "wall_s.txt").write_text(f"{seconds:.1f}\n")
    seconds = float((run / "wall_s.txt").read_text())
    with open(run / "ranking.csv") as f:
        rows = {r["candidate"]: r for r in csv.DictReader(f)}
    by_label = {}
    for label, backbone, pretrained in CANDIDATES:
        key = backbone if pretrained else f"{backbone} (random init)"
        if key in rows:
            by_label[label] = rows[key]
    return by_label, seconds


def finetune(dataset: str, label: str, backbone: str, pretrained: bool, extra: list[str] = ()) -> dict | None:
    """The metrics.json of one default fine-tuning run (run now unless it is there)."""
    run = OUT / dataset / (label + "".join(f"_{e.split('=')[-1]}ep" for e in extra))
    metrics = run / "metrics.json"
    if not metrics.is_file():
        run.mkdir(parents=True, exist_ok=True)
        args = ["experiment=fashion_mnist_lite0", "finetune=full", *DATASETS[dataset][0], *DATASETS[dataset][1],
                *extra, f"model.backbone={backbone}", f"model.pretrained={str(pretrained).lower()}",
                "callbacks.progress.refresh_rate=0", "restart=true", f"hydra.run.dir={run}"]  # fmt: skip
        wall = python("-m", "visiontune.train", *args, log=run / "train.log")
        if metrics.is_file():
            data = json.loads(metrics.read_text())
            data["wall_s"] = round(wall, 1)
            metrics.write_text(json.dumps(data, indent=2))
    return json.loads(metrics.read_text()) if metrics.is_file() else None


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def measure(dataset: str) -> None:
    rows, rank_s = rank(dataset)
    print(f"\n## {dataset}: ranking {rank_s:.0f} s (wall, empty cache)", flush=True)
    table, finetune_s = [], 0.0
    for label, backbone, pretrained in CANDIDATES:
        metrics = finetune(dataset, label, backbone, pretrained)
        if metrics is None or label not in rows:
            print(f"{label}: missing ({'no ranking row' if label not in rows else 'the fine-tuning failed'})")
            continue
        finetune_s += metrics.get("wall_s", metrics["train_time_s"])
        table.append((label, float(rows[label]["logme"]), float(rows[label]["knn_acc"]), metrics["test/acc"],
                      metrics["train_time_s"], metrics.get("wall_s", float("nan"))))  # fmt: skip
    print("| candidate | LogME | k-NN acc | test acc after fine-tuning | train s | run wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, lm, knn, acc, train_s, wall in sorted(table, key=lambda r: -r[3]):
        print(f"| {label} | {lm:.4f} | {knn:.3f} | {acc:.4f} | {train_s:.0f} | {wall:.0f} |")
    random = {label for label, _, pretrained in CANDIDATES if not pretrained}
    for which, rows_ in (("all", table), ("pretrained only", [r for r in table if r[0] not in random])):
        accs = [r[3] for r in rows_]
        print(f"Spearman with the test accuracy, {which} ({len(rows_)} candidates): "
              f"LogME {spearman([r[1] for r in rows_], accs):+.2f}, k-NN {spearman([r[2] for r in rows_], accs):+.2f}")  # fmt: skip
    print(f"time: ranking {rank_s:.0f} s against fine-tuning them all {finetune_s:.0f} s (wall)", flush=True)


def transfer() -> None:
    """Digits from ImageNet Lite0 against digits from Lite0 fine-tuned on Fashion-MNIST, at 1 and 4 epochs."""
    print(
        "\n## chained transfer on digits (experiment=fashion_mnist_lite0 finetune=full, 64 px, all 1,259 train images)"
    )
    print("| start | epochs | test acc | train s |")
    print("|---|---:|---:|---:|")
    for epochs in (1, 4):
        for label, backbone in (("lite0", "efficientnet_lite0"), ("lite0_fmnist", f"ckpt:{FMNIST_CKPT}")):
            extra = [] if epochs == 4 else [f"trainer.max_epochs={epochs}"]
            m = finetune("digits", label, backbone, True, extra)
            if m:
                print(
                    f"| {backbone} | {epochs} | {m['test/acc']:.4f} | {m['train_time_s']:.0f} |", flush=True
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("digits", "fashion_mnist", "transfer"))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for dataset in ("digits", "transfer", "fashion_mnist"):
        if args.only in (None, dataset):
            transfer() if dataset == "transfer" else measure(dataset)


if __name__ == "__main__":
    main()
