"""Measure the template against a plain PyTorch loop, side by side in one run; print a table, write JSON.

    .venv/bin/python scripts/benchmark.py [--out benchmark.json] [--only a,b,c,d,e,f,g] [--quick]
    .venv/bin/python scripts/benchmark.py --device cuda --precision bf16-mixed --channels-last   # a GPU

Every figure is EfficientNet-Lite0 (ImageNet weights) on Fashion-MNIST at 64 px, batch 64, AdamW,
augment=none, on this machine's threads. A "step" is the wall time between the starts of two
consecutive training batches: loading, the step itself and every hook in between.

  (a) overhead: median step through `visiontune.train.train` / median step of the plain loop, both
      on the same model, batch, resolution, data (uint8 batches, the same batched transform) and optimizer;
  (b) loader efficiency: median step on a batch already on the device / median step on real batches,
      for the in-memory data and for a JPEG folder without and with data.cache=memory (epoch 2);
  (c) linear probe: epoch time without / with the frozen-feature cache (epochs after the first), and
      both test accuracies;
  (d) freeze_groups with the bottom half frozen: median step / the full fine-tune's;
  (e) bf16-mixed and channels_last: median step / fp32's;
  (f) time to 89% test accuracy (10k train images; the clock stops while the test set is scored):
      the template against the plain loop;
  (g) memory: the linear probe's feature cache for the whole training set on disk (MB), and the time to
      build it; the peak RSS of the process closes the table.

`--quick` shrinks everything to check that the script runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # noqa: E402 - compose_cfg: Hydra's compose API over the package conf

from helpers import compose_cfg  # noqa: E402

from visiontune import train as train_mod  # noqa: E402
from visiontune.build import build_datamodule, build_model  # noqa: E402
from visiontune.data.device import BatchTransform  # noqa: E402
from visiontune.training.features import plan_feature_cache  # noqa: E402

BASE = ["experiment=fashion_mnist_lite0", "logger=csv", "callbacks.progress.refresh_rate=0", "seed=0"]


class StepTimer(L.Callback):
    """Start times of training batches, epoch durations, and (optionally) test accuracy every K steps."""

    def __init__(self, every: int = 0, evaluate=None, target: float | None = None):
        self.starts: list[float] = []
        self.epochs: list[float] = []
        self.every, self.evaluate, self.target = every, evaluate, target
        self.paused = 0.0
        self.t0 = 0.0
        self.reached: float | None = None
        self.curve: list[tuple[int, float, float]] = []

    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(time.perf_counter() - self._epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.evaluate and self.every and step % self.every == 0 and self.reached is None:
            pause = time.perf_counter()
            elapsed = pause - self.t0 - self.paused
            acc = self.evaluate(pl_module)
            self.paused += time.perf_counter() - pause
            self.curve.append((step, round(elapsed, 1), acc))
            if self.target is not None and acc >= self.target:
                self.reached = elapsed
                trainer.should_stop = True


def median_step(starts: list[float], skip: int = 5) -> float:
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)][skip:]
    return statistics.median(gaps) if gaps else float("nan")


def run_template(overrides: list[str], out: Path, timer: StepTimer) -> dict:
    """visiontune.train.train(cfg) with `timer` added to its callbacks; returns metrics.json."""
    train_mod.train(compose_cfg([*BASE, *overrides], out), callbacks=[timer])
    return json.loads((out / "metrics.json").read_text())


def plain_setup(overrides: list[str], device: str, channels_last: bool):
    """The template's own model, data and optimizer groups, built once for the plain loop."""
    cfg = compose_cfg([*BASE, *overrides], Path(tempfile.mkdtemp()))
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    model = build_model(cfg, dm).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.param_groups(), lr=cfg.optimizer.lr)
    return cfg, dm, model, opt


def uint8_batches(dataset, batch: int, seed: int = 0):
    """Shuffled uint8 (images, labels) batches of an in-memory split, as a plain loop would slice them."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i : i + batch]
        yield dataset.images[idx], dataset.labels[idx]


def plain_steps(model, opt, batches, transform, device, steps: int, precision: str = "32", every=0, evaluate=None,
                target=None, cosine_steps: int = 0):  # fmt: skip
    """The hand-written loop: step times, and the time to `target` test accuracy when asked
    (with `cosine_steps`, the LR follows the template's cosine schedule over that many steps)."""
    model.train()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cosine_steps) if cosine_steps else None
    starts, curve, paused, reached = [], [], 0.0, None
    t0 = time.perf_counter()
    autocast = torch.autocast(
        device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16-mixed"
    )
    for step, (x, y) in enumerate(batches, start=1):
        starts.append(time.perf_counter())
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if transform is not None:
            x = transform(x)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        if evaluate and every and step % every == 0:
            pause = time.perf_counter()
            acc = evaluate(model)
            model.train()
            elapsed = pause - t0 - paused
            paused += time.perf_counter() - pause
            curve.append((step, round(elapsed, 1), acc))
            if target is not None and acc >= target:
                reached = elapsed
                break
        if step >= steps:
            break
    return starts, curve, reached


def test_accuracy_fn(dm, device, limit=None):
    """Accuracy on the test split through the exact eval transform (batched), in eval mode."""
    test = dm.test_set
    images = test.images if limit is None else test.images[:limit]
    labels = test.labels if limit is None else test.labels[:limit]
    transform = BatchTransform(None, dm.image_size, dm.mean, dm.std, dm.interpolation, dm.crop_pct)

    @torch.inference_mode()
    def evaluate(model) -> float:
        was = model.training
        model.eval()
        correct = 0
        for i in range(0, len(labels), 256):
            x = transform(images[i : i + 256].to(device))
            correct += (model(x).argmax(1).cpu() == labels[i : i + 256]).sum().item()
        model.train(was)
        return correct / len(labels)

    return evaluate


def fmt(x, digits=3):
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmark.json")
    ap.add_argument("--only", default="a,b,c,d,e,f,g")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="32", help="precision of the (a) and (f) runs, e.g. bf16-mixed")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    steps = 12 if args.quick else 60
    gpu = args.device.startswith("cuda")
    trainer = ["trainer=gpu"] if gpu else []
    common = [
        *trainer,
        f"trainer.precision={args.precision}",
        f"model.channels_last={str(args.channels_last).lower()}",
    ]
    if args.quick:
        common += [
            "data.train_subset=2000",
            "data.val_subset=200",
            "data.test_subset=500",
            "data.image_size=32",
        ]
    work = Path(tempfile.mkdtemp(prefix="vt-bench-"))
    results: dict = {
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
            "cuda": torch.cuda.get_device_name(0) if gpu and torch.cuda.is_available() else None,
        },
        "command": " ".join(["scripts/benchmark.py", *sys.argv[1:]]),
        "setup": "Lite0 (ImageNet weights), Fashion-MNIST 64 px, batch 64, AdamW, augment=none"
        + (" [--quick: 32 px, small subsets]" if args.quick else ""),
    }  # fmt: skip
    rows: list[tuple[str, str, str]] = []
    no_val = ["+trainer.limit_val_batches=0", "test=false", "trainer.num_sanity_val_steps=0"]

    if "a" in only or "b" in only:
        t = StepTimer()
        run_template([*common, *no_val, f"+trainer.max_steps={steps}"], work / "a", t)
        template_step = median_step(t.starts)
        cfg, dm, model, opt = plain_setup(common, args.device, args.channels_last)
        transform = dm.device_transforms[0] if dm.enable_device_transforms("auto") else None
        plain, _, _ = plain_steps(model, opt, uint8_batches(dm.train_set, 64), transform, args.device, steps,
                                  args.precision)  # fmt: skip
        plain_step = median_step(plain)
        results["a_overhead"] = {"template_step_s": template_step, "plain_step_s": plain_step,
                                 "ratio": template_step / plain_step, "target": "<= 1.02"}  # fmt: skip
        rows.append(("(a) overhead: template / plain step", fmt(template_step / plain_step), "<= 1.02"))

    if "b" in only:
        x0, y0 = next(uint8_batches(dm.train_set, 64))
        fixed = transform(x0.to(args.device)) if transform else x0.to(args.device)
        one = [(fixed, y0)] * (steps + 1)
        on_device, _, _ = plain_steps(model, opt, one, None, args.device, steps, args.precision)
        eff = median_step(on_device) / plain_step
        results["b_loader"] = {"in_memory": {"fixed_batch_step_s": median_step(on_device), "real_step_s": plain_step,
                                             "efficiency": eff}}  # fmt: skip
        rows.append(("(b) loader efficiency, in memory", fmt(eff), ">= 0.95"))
        folder = write_jpeg_folder(work / "jpeg", 600 if args.quick else 3000)
        for mode in ("none", "memory"):
            fdm = build_datamodule(compose_cfg([*BASE, *common, "data=imagefolder", f"data.root={folder}",
                                                "data.image_size=64", f"data.cache={mode}", "data.batch_size=64"],
                                               work / f"f-{mode}"))  # fmt: skip
            fdm.setup("fit")
            loader = fdm.train_dataloader()
            for _ in range(2 if mode == "memory" else 1):  # cached: the second epoch
                starts, _, _ = plain_steps(model, opt, iter(loader), None, args.device, steps, args.precision)
            real = median_step(starts)
            results["b_loader"][f"jpeg_{mode}"] = {"real_step_s": real, "efficiency": median_step(on_device) / real,
                                                    "num_workers": loader.num_workers}  # fmt: skip
            target = ">= 0.90" if mode == "memory" else "-"
            rows.append((f"(b) loader efficiency, JPEG folder, data.cache={mode}", fmt(median_step(on_device) / real),
                         target))  # fmt: skip

    if "c" in only:
        probe = [*common, "finetune=linear_probe", "trainer.max_epochs=3"]
        out = {}
        for setting in ("false", "auto"):
            t = StepTimer()
            start = time.perf_counter()
            m = run_template([*probe, f"finetune.cache_features={setting}"], work / f"c-{setting}", t)
            out[setting] = {
                "epoch_s": t.epochs,
                "test_acc": m.get("test/acc"),
                "total_s": time.perf_counter() - start,
            }
        later = lambda s: statistics.median(out[s]["epoch_s"][1:])  # noqa: E731
        results["c_linear_probe"] = {**out, "speedup_after_first_epoch": later("false") / later("auto")}
        rows.append(("(c) linear probe epoch speed-up with the feature cache", fmt(later("false") / later("auto"), 1),
                     ">= 20"))  # fmt: skip
        diff = abs(out["false"]["test_acc"] - out["auto"]["test_acc"]) * 100
        rows.append(("(c) linear probe test acc, uncached / cached",
                     f"{out['false']['test_acc']:.4f} / {out['auto']['test_acc']:.4f}", "diff <= 0.5 pt"))  # fmt: skip
        results["c_linear_probe"]["acc_diff_points"] = diff

    if "d" in only or "e" in only:
        timed = {}
        half = ["finetune=freeze_groups", "finetune.groups=0:4"]
        variants = {
            "full": [],
            "half_frozen": [*half, "finetune.cache_features=false"],
            "half_frozen_cached": [*half, "finetune.cache_features=true"],
        }
        if "e" in only and not gpu:
            variants |= {
                "bf16": ["trainer.precision=bf16-mixed"],
                "channels_last": ["model.channels_last=true"],
            }
        for name, extra in variants.items():
            t = StepTimer()
            run_template([*common, *no_val, f"+trainer.max_steps={steps}", *extra], work / f"d-{name}", t)
            timed[name] = median_step(t.starts)
        results["d_e_steps_s"] = timed
        if "half_frozen" in timed:
            rows.append(("(d) half frozen / full step", fmt(timed["half_frozen"] / timed["full"]), "<= 0.70"))
            rows.append(("(d) half frozen, prefix cache / full step", fmt(timed["half_frozen_cached"] / timed["full"]),
                         "<= 0.40"))  # fmt: skip
        for name in ("bf16", "channels_last"):
            if name in timed:
                rows.append((f"(e) {name} / fp32 step", fmt(timed[name] / timed["full"]), "measured"))

    if "f" in only:
        target = 0.6 if args.quick else 0.89
        every = 5 if args.quick else 20
        cfg, dm, model, opt = plain_setup(common, args.device, args.channels_last)
        evaluate = test_accuracy_fn(dm, args.device)
        t = StepTimer(every=every, evaluate=evaluate, target=target)
        run_template([*common, *no_val, "trainer.max_epochs=3"], work / "f", t)
        transform = dm.device_transforms[0] if dm.enable_device_transforms("auto") else None
        batches = (b for epoch in range(3) for b in uint8_batches(dm.train_set, 64, seed=epoch))
        total = 3 * (len(dm.train_set) // 64)
        _, curve, reached = plain_steps(model, opt, batches, transform, args.device, 10**9, args.precision, every,
                                        evaluate, target, cosine_steps=total)  # fmt: skip
        results["f_time_to_accuracy"] = {"target": target, "template_s": t.reached, "plain_s": reached,
                                         "template_curve": t.curve, "plain_curve": curve}  # fmt: skip
        rows.append((f"(f) time to {target:.0%} test acc, template / plain (s)",
                     f"{fmt(t.reached, 0)} / {fmt(reached, 0)}", "-"))  # fmt: skip

    if "g" in only:  # the linear probe's feature cache for the whole training set, stored on disk
        store = work / "g-cache"
        overrides = [*common, "finetune=linear_probe", f"finetune.cache_dir={store}"]
        cfg = compose_cfg(
            [*BASE, *overrides, *([] if args.quick else ["data.train_subset=null"])], work / "g"
        )
        dm = build_datamodule(cfg)
        model = build_model(cfg, dm)
        start = time.perf_counter()
        plan_feature_cache(model, cfg).build(model, dm, cfg, args.device)
        sizes = {f.name: f.stat().st_size / 2**20 for f in store.glob("*.npy")}
        train_mb = max(sizes.values())  # the training split's file is the largest
        results["g_feature_cache"] = {"train_images": len(dm.train_set), "train_mb": train_mb,
                                      "all_splits_mb": sum(sizes.values()),
                                      "build_s": time.perf_counter() - start}  # fmt: skip
        rows.append((f"(g) linear-probe feature cache on disk, {len(dm.train_set)} train images (MB)",
                     f"{train_mb:.0f}", "< 300"))  # fmt: skip
        rows.append(("(g) building it for train + val + test (s)", f"{results['g_feature_cache']['build_s']:.0f}",
                     "-"))  # fmt: skip

    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(("peak RSS of this process (MB)", f"{results['peak_rss_mb']:.0f}", "-"))
    print_table(rows, results["machine"])
    Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    print(f"wrote {args.out}")


def write_jpeg_folder(root: Path, n: int) -> Path:
    """n Fashion-MNIST training images as JPEG files in train/<class>/ (and a small test/)."""
    from PIL import Image

    from visiontune.data.standard import FASHION_CLASSES, load_standard

    x, y = load_standard("fashion_mnist", ROOT / "data", train=True)
    for split, rng in (("train", range(n)), ("test", range(n, n + n // 10))):
        for i in rng:
            d = root / split / FASHION_CLASSES[int(y[i])].replace("/", "-")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0].numpy()).save(d / f"{i}.jpg", quality=90)
    return root


def print_table(rows, machine) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\nmachine: {machine['processor']}, {machine['threads']} threads, torch {machine['torch']}, "
          f"device {machine['device']}")  # fmt: skip
    print(f"{'measure':<{width}}  {'value':>15}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>15}  {target}")


if __name__ == "__main__":
    main()
