#!/usr/bin/env bash
# GPU check: the default run (Lite0 on 10k Fashion-MNIST at 64 px, 2 epochs) with trainer=gpu in
# bf16-mixed, 16-mixed and 32, reporting test accuracy and throughput. Run on a CUDA machine:
#     bash scripts/gpu_check.sh            (uses .venv/bin/python, or PY=...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0))"
out=outputs/gpu_check
mkdir -p "$out"
for precision in bf16-mixed 16-mixed 32; do
  "$PY" -m visiontune.train experiment=fashion_mnist_lite0 restart=true trainer=gpu trainer.precision="$precision" data.batch_size=256 \
    data.num_workers=4 callbacks.progress.refresh_rate=50 hydra.run.dir="$out/$precision" "$@" \
    >"$out/$precision.log" 2>&1 || { echo "$precision: FAILED (see $out/$precision.log)"; continue; }
  "$PY" - "$out/$precision/metrics.json" "$precision" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:>10}: test/acc {m['test/acc']:.4f}  fit {m['train_time_s']:.1f} s  {m['images_per_s']:.0f} img/s")
PYEOF
done
# LoRA (peft layers) under bf16-mixed on CUDA: trains, writes its adapter, and the adapter evaluates alike.
if "$PY" -m visiontune.train experiment=fashion_mnist_lite0 restart=true trainer=gpu trainer.precision=bf16-mixed \
    finetune=lora data.batch_size=256 data.num_workers=4 callbacks.progress.refresh_rate=50 \
    hydra.run.dir="$out/lora" >"$out/lora.log" 2>&1 \
  && "$PY" -m visiontune.eval ckpt_path="$out/lora/adapter.safetensors" hydra.run.dir="$out/lora_eval" >>"$out/lora.log" 2>&1; then
  "$PY" -c "import json; a, b = (json.load(open(f'$out/{d}/metrics.json'))['test/acc'] for d in ('lora', 'lora_eval')); print(f'      lora: test/acc {a:.4f}, from the adapter file {b:.4f}')"
else
  echo "lora: FAILED (see $out/lora.log)"
fi
# The benchmark (scripts/benchmark.py) on CUDA with bf16-mixed and channels_last: framework overhead,
# loader efficiency (in memory, JPEG folder with and without data.cache), feature cache, frozen prefix.
"$PY" scripts/benchmark.py --device cuda --precision bf16-mixed --channels-last --only a,b,c,d \
  --out "$out/benchmark_cuda.json" >"$out/benchmark.log" 2>&1 && tail -n 15 "$out/benchmark.log" \
  || echo "benchmark: FAILED (see $out/benchmark.log)"
