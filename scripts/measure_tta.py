"""Measure test-time adaptation (adapt=none|bn|tent) on trained checkpoints: clean accuracy and the
robustness eval's mean accuracy (all severities, and severities 3-5), one table.

    python scripts/measure_tta.py outputs/compare_peft/full/checkpoints/best.ckpt \
        outputs/compare_peft_digits/full/checkpoints/best.ckpt --test-subset 2000 --robustness-subset 500

Every method runs through the same code as `visiontune-eval adapt=...`: the clean accuracy is
`InferenceSession.collect` over the (seeded, stratified) test subset with the session's adapter, and the
robustness pass is `evaluation.robustness.run_robustness` with every variant as an extra column, each
reset before every corruption x severity cell. Writes <out>/<dataset>/robustness.csv and results.json,
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from visiontune.deploy.inference import quiet_warnings
from visiontune.deploy.session import InferenceSession
from visiontune.evaluation import robustness
from visiontune.evaluation.adapt import AdaptSettings, make_adapter

VARIANTS = {
    "bn": AdaptSettings(method="bn"),
    "tent": AdaptSettings(method="tent", lr=1e-3),
    "tent_lr1e-4": AdaptSettings(method="tent", lr=1e-4),
    "tent_reset_batch": AdaptSettings(method="tent", lr=1e-3, reset="batch"),
}


def clean_accuracy(session, settings, test_subset: int | None, like) -> float:
    session.adapter = (
        None if settings is None else make_adapter(session.model, settings, session.heads, like.batch_size)
    )
    test_set = session.datamodule.test_set
    keep = robustness.subset_indices(test_set.labels, test_subset, 0)
    logits, targets, _ = session.collect(torch.utils.data.Subset(test_set, keep.tolist()), like=like)
    session.adapter = None
    return float((logits.argmax(1) == targets[session.heads[0].name]).float().mean())


def measure(
    ckpt: str, out: Path, test_subset: int | None, robustness_subset: int | None, variants, batch_size=None
) -> dict:
    session = InferenceSession.from_checkpoint(
        ckpt, "cpu", {"batch_size": batch_size} if batch_size else None
    )
    datamodule = session.labelled_data()
    datamodule.setup("test")
    like = datamodule.test_dataloader()
    data = datamodule.cfg
    name = (
        Path(str(data.get("root"))).name
        if data.get("name") in ("imagefolder", "csv")
        else str(data.get("name"))
    )
    out = out / name
    out.mkdir(parents=True, exist_ok=True)
    result = {"ckpt": ckpt, "batch_size": like.batch_size, "methods": {}}
    started = time.perf_counter()
    for method, settings in {"none": None, **variants}.items():
        acc = clean_accuracy(session, settings, test_subset, like)
        result["methods"][method] = {"test_acc": acc}
        print(
            f"{name} {method}: clean test acc {acc:.4f} ({time.perf_counter() - started:.0f} s)", flush=True
        )
    adapters = {
        m: make_adapter(session.model, s, session.heads, like.batch_size) for m, s in variants.items()
    }
    metrics = robustness.run_robustness(session, robustness_subset, 0, out, like=like, adapters=adapters)
    with open(out / "robustness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for method in result["methods"]:
        column = "accuracy" if method == "none" else f"accuracy_{method}"
        cells = [(int(r["severity"]), float(r[column])) for r in rows if r["corruption"] != robustness.CLEAN]
        result["methods"][method].update(
            robust_clean=float(next(r[column] for r in rows if r["corruption"] == robustness.CLEAN)),
            robust_mean=float(np.mean([a for _, a in cells])),
            robust_mean_s345=float(np.mean([a for s, a in cells if s >= 3])),
        )
    result.update(
        images=metrics["robust/images"], test_subset=test_subset, seconds=time.perf_counter() - started
    )
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return {name: result}


def table(results: dict) -> str:
    lines = [
        "| data | adapt | clean test acc | robust clean | robust mean (sev 1-5) | robust mean (sev 3-5) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        base = result["methods"]["none"]
        for method, m in result["methods"].items():
            delta = "" if method == "none" else (
                f" ({100 * (m['test_acc'] - base['test_acc']):+.1f})",
                f" ({100 * (m['robust_mean'] - base['robust_mean']):+.1f})",
                f" ({100 * (m['robust_mean_s345'] - base['robust_mean_s345']):+.1f})",
            )  # fmt: skip
            d = delta or ("", "", "")
            lines.append(
                f"| {name} | {method} | {100 * m['test_acc']:.1f}{d[0]} | {100 * m['robust_clean']:.1f} | "
                f"{100 * m['robust_mean']:.1f}{d[1]} | {100 * m['robust_mean_s345']:.1f}{d[2]} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("outputs/measure_tta"))
    parser.add_argument(
        "--test-subset", type=int, default=None, help="clean accuracy on N test images (default all)"
    )
    parser.add_argument("--robustness-subset", type=int, default=2000, help="images per robustness cell")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the checkpoint's data.batch_size"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="of: " + ",".join(VARIANTS))
    args = parser.parse_args()
    quiet_warnings()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    variants = {k: VARIANTS[k] for k in args.variants.split(",")}
    results = {}
    for ckpt in args.ckpts:
        results.update(
            measure(ckpt, args.out, args.test_subset, args.robustness_subset, variants, args.batch_size)
        )
        print(table(results), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
