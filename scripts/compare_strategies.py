"""Compare fine-tuning strategies at the default run's budget; print a markdown table.

    .venv/bin/python scripts/compare_strategies.py [--peft [--out=DIR]] [extra overrides...]

Each strategy is one `python -m visiontune.train` run (Lite0, 10k Fashion-MNIST images, 64 px,
2 epochs) into outputs/compare/<strategy>/; the table goes to stdout and outputs/compare/summary.md.
`--peft` compares the parameter-efficient strategies with full fine-tuning, the linear probe and the
bottom half frozen, and adds what each run must keep on disk: the adapter file of bitfit, norm and
lora, the best checkpoint's weights for the others.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

STRATEGIES = {
    "linear_probe": ["finetune=linear_probe"],
    "freeze_unfreeze": ["finetune=freeze_unfreeze", "finetune.unfreeze_at_epoch=1"],
    "gradual": ["finetune=gradual", "finetune.every_k_epochs=1"],
    "full": ["finetune=full"],
}
PEFT = {
    "full": ["finetune=full"],
    "linear_probe": ["finetune=linear_probe"],
    "freeze_groups (bottom half)": ["finetune=freeze_groups", "finetune.groups=0:4"],
    "bitfit": ["finetune=bitfit"],
    "norm": ["finetune=norm"],
    **{
        f"lora r={r}": ["finetune=lora", f"finetune.lora.r={r}", f"finetune.lora.alpha={2 * r}"]
        for r in (4, 8, 16)
    },
}


def artefact_mb(run_dir: Path, metrics: dict) -> float:
    """The adapter file, or else the best checkpoint's weights (its state_dict, without optimizer state)."""
    if "adapter_mb" in metrics:
        return metrics["adapter_mb"]
    import torch

    state = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    return sum(t.numel() * t.element_size() for t in state.values()) / 1e6


def peft_table(extra: list[str]) -> None:
    out = Path("outputs/compare_peft")
    if extra[:1] and extra[0].startswith("--out="):  # another data set's table beside the first
        out, extra = Path(extra[0].removeprefix("--out=")), extra[1:]
    rows = []
    for name, overrides in PEFT.items():
        run_dir = out / re.sub(r"\W+", "_", name).strip("_")
        cmd = [sys.executable, "-m", "visiontune.train", "experiment=fashion_mnist_lite0", *overrides, *extra]
        cmd += [f"hydra.run.dir={run_dir}", "restart=true"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        m = json.loads((run_dir / "metrics.json").read_text())
        total = m["trainable_params"] + m["frozen_params"]
        cache = m.get("feature_cache_s")
        rows.append(
            f"| `{name}` | {100 * m['test/acc']:.1f}% | {m['trainable_params'] / 1e6:.3f}M "
            f"({100 * m['trainable_params'] / total:.2f}%) | {artefact_mb(run_dir, m):.2f} MB | "
            f"{m['train_time_s']:.0f} s{f' (+{cache:.0f} s cache)' if cache else ''} |"
        )
        print(rows[-1], flush=True)
    head = "| strategy | test acc | trainable params | artefact on disk | training time |"
    table = "\n".join([head, "|---|---|---|---|---|", *rows])
    (out / "summary.md").write_text(table + "\n")
    print(table)


def main() -> None:
    extra = sys.argv[1:]
    if extra[:1] == ["--peft"]:
        peft_table(extra[1:])
        return
    out = Path("outputs/compare")
    rows = []
    for name, overrides in STRATEGIES.items():
        run_dir = out / name
        cmd = [sys.executable, "-m", "visiontune.train", "experiment=fashion_mnist_lite0", *overrides, *extra]
        cmd += [f"hydra.run.dir={run_dir}", "restart=true"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        m = json.loads((run_dir / "metrics.json").read_text())
        cache = m.get("feature_cache_s")
        rows.append(
            f"| `{name}` | {100 * m['test/acc']:.1f}% | {m['train_time_s']:.0f} s | "
            f"{f'{cache:.0f} s' if cache is not None else '-'} | "
            f"{m['trainable_params'] / 1e6:.2f}M / {m['frozen_params'] / 1e6:.2f}M |"
        )
    head = (
        "| strategy | test acc | training time | feature cache (before fit) | trainable / frozen at start |"
    )
    table = "\n".join([head, "|---|---|---|---|---|", *rows])
    (out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
