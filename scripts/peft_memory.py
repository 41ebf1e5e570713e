"""Peak memory of N tasks on one backbone (adapters) against N full models; prints a markdown table.

    .venv/bin/python scripts/peft_memory.py [ADAPTER [CHECKPOINT]]

Defaults: the LoRA r=8 adapter and the full fine-tuning checkpoint of `scripts/compare_strategies.py
--peft` (outputs/compare_peft/). For N = 1, 2, 4, a fresh process loads the N tasks, as
`visiontune-serve adapters=...` does (InferenceSession.from_adapters, the one adapter file under N
task names) or as N services of full checkpoints would (InferenceSession.from_checkpoint N times), runs
one batch of 8 images through each, and reports the tensors its models hold (each storage counted
once) and its peak resident memory (ru_maxrss, which includes the imports and what loading freed).
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, resource, sys, torch
from visiontune.deploy.session import InferenceSession
kind, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if kind == "adapters":
    sessions = list(InferenceSession.from_adapters({f"t{i}": path for i in range(n)}, "cpu").values())
else:
    sessions = [InferenceSession.from_checkpoint(path, "cpu") for _ in range(n)]
with torch.no_grad():
    for session in sessions:
        session.logits(torch.zeros(8, 3, 64, 64))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
held = {}  # the tensors the models hold, each storage once
for session in sessions:
    for t in [*session.model.parameters(), *session.model.buffers()]:
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
print(json.dumps({"peak_mb": peak / 1024, "imports_mb": base / 1024, "tensors_mb": sum(held.values()) / 1e6}))
"""


def measure(kind: str, path: str, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, kind, path, str(n)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    adapter = sys.argv[1] if len(sys.argv) > 1 else "outputs/compare_peft/lora_r_8/adapter.safetensors"
    checkpoint = sys.argv[2] if len(sys.argv) > 2 else "outputs/compare_peft/full/checkpoints/best.ckpt"
    rows = [
        "| tasks | adapters: weights held | adapters: peak RSS | full models: weights held | full models: peak RSS |",
        "|---|---|---|---|---|",
    ]
    for n in (1, 2, 4):
        a, f = measure("adapters", adapter, n), measure("full", checkpoint, n)
        rows.append(
            f"| {n} | {a['tensors_mb']:.1f} MB | {a['peak_mb']:.0f} MB | {f['tensors_mb']:.1f} MB | {f['peak_mb']:.0f} MB |"
        )
        print(rows[-1], flush=True)
    print(f"(after imports alone: {a['imports_mb']:.0f} MB)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
