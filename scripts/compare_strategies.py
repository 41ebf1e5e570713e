"""Compare fine-tuning strategies at the default run's budget; print a markdown table.

    .venv/bin/python scripts/compare_strategies.py [extra overrides...]

Each strategy is one `python -m visiontune.train` run (Lite0, 10k Fashion-MNIST images, 64 px,
2 epochs) into outputs/compare/<strategy>/; the table goes to stdout and outputs/compare/summary.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STRATEGIES = {
    "linear_probe": ["finetune=linear_probe"],
    "freeze_unfreeze": ["finetune=freeze_unfreeze", "finetune.unfreeze_at_epoch=1"],
    "gradual": ["finetune=gradual", "finetune.every_k_epochs=1"],
    "full": ["finetune=full"],
}


def main() -> None:
    extra = sys.argv[1:]
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
