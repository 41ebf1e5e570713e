"""`visiontune-train [overrides]`: one fine-tuning run, start to finish.

The whole run reads top to bottom in `train(cfg)`: the config checks, the seed, the run
(`visiontune.build.build_run`: data, model, callbacks, loggers, Trainer), fit, test, metrics.json
and the summary. Everything the run is made of is decided in `build_run`; this module only runs it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from visiontune.build import Run, build_run
from visiontune.cli import CONF_DIR, SUMMARY_KEYS, RunStopped, print_summary, run_cli
from visiontune.config import validate_config
from visiontune.data.temporaries import write_json
from visiontune.errors import UserError
from visiontune.models.adapters import ADAPTER_FILE
from visiontune.training.checkpoints import load_checkpoint, save_adapter
from visiontune.training.finetune import ParameterEfficient

log = logging.getLogger("visiontune")


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> float:
    """Fit, test the best checkpoint, write metrics.json; return the optimized metric (the monitor's best).

    `callbacks` join the run's own (a script or a test that watches the run).
    """
    validate_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = cfg.get("ckpt_path") or requeued_slurm_checkpoint(run_dir)
    check_run_dir(run_dir / "checkpoints", ckpt_path, bool(cfg.get("restart")))
    L.seed_everything(cfg.seed, workers=True)
    run = build_run(cfg, ckpt_path, callbacks)
    trainer, model, datamodule = run.trainer, run.model, run.datamodule

    suggestion = find_lr(run, cfg, run_dir) if cfg.tune.lr_find else None
    start = time.perf_counter()
    fit(run, ckpt_path)
    train_time = time.perf_counter() - start

    monitor = cfg.callbacks.checkpoint.monitor
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("lr-")}
    if run.best.best_model_score is not None:  # the best value of the monitor, under its own name
        metrics[monitor] = float(run.best.best_model_score)
    if cfg.get("test"):
        best = run.best.best_model_path or None
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics.update({k: float(v) for k, v in tested[0].items()})
    metrics.update(
        train_time_s=round(train_time, 2),
        epochs=trainer.current_epoch,
        epochs_this_run=run.clock.epochs,
        train_images=len(datamodule.train_set),
        images_per_s=round(run.clock.images / max(train_time, 1e-9), 1),
        **run.freeze.start_counts,
        best_ckpt=run.best.best_model_path,
        lr=model.lr,
        peak_rss_mb=peak_rss_mb(),
    )
    if run.feature_cache is not None:  # the frozen layers' pass over the data, built before train_time_s
        metrics["feature_cache_s"] = round(run.feature_cache.seconds, 2)
    if suggestion is not None:
        metrics["lr_find/suggestion"] = suggestion
    if trainer.is_global_zero:
        adapter = write_adapter(model, run.best.best_model_path, run_dir)
        if adapter is not None:
            metrics.update(adapter_file=str(adapter), adapter_mb=round(adapter.stat().st_size / 1e6, 3))
        write_json(run_dir / "metrics.json", metrics, indent=2, sort_keys=True)  # never a half-written file
        # a task's per-head test figures (test/<head>/acc, test/map, ...) follow the monitor
        ends = ("/acc", "/map", "/f1", "/score")
        heads = sorted(k for k in metrics if k.startswith("test/") and k.endswith(ends))
        print_summary(metrics, run_dir, keys=tuple(dict.fromkeys((monitor, *heads, *SUMMARY_KEYS))))
    return metrics.get(cfg.get("optimized_metric") or monitor, float("nan"))


def write_adapter(model, best_path: str, run_dir: Path) -> Path | None:
    """A parameter-efficient run (finetune=lora|bitfit|norm) writes what it trained, from its best
    checkpoint, as adapter.safetensors: the pretrained backbone and that file rebuild the model."""
    if not isinstance(model.freeze_schedule, ParameterEfficient) or not best_path:
        return None
    if not model.hparams.model.get("pretrained", True):
        log.info("no %s: the backbone has no pretrained weights to rebuild it from (model.pretrained=false)",
                 ADAPTER_FILE)  # fmt: skip
        return None
    path = save_adapter(model, load_checkpoint(best_path), run_dir)
    log.info(
        "%s: the trained tensors, %.2f MB (ckpt_path=%s loads it)", path.name, path.stat().st_size / 1e6, path
    )
    return path


def fit(run: Run, ckpt_path: str | Path | None) -> None:
    """`trainer.fit`, with interrupts and crashes turned into one line that says how to continue."""
    trainer, interrupts, last = run.trainer, run.interrupts, run.ckpt_dir / "last.ckpt"
    try:
        with warnings.catch_warnings():
            # ResumeMidEpoch makes a mid-epoch resume exact, which Lightning cannot see from the loader
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            # StepLogInterval lowers log_every_n_steps to the epoch's steps once training starts
            warnings.filterwarnings("ignore", message=".* is smaller than the logging interval")
            # a line per LR group name: MLflow's metric names drop the ':' and '+' of the group names
            warnings.filterwarnings("ignore", message="MLFlow only allows")
            trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=ckpt_path)
    except UserError:
        raise
    except (SystemExit, KeyboardInterrupt) as exc:  # Lightning ends SIGTERM and SIGINT with SystemExit
        if interrupts.signal is None:
            raise
        raise stopped(run) from exc
    except Exception as exc:
        if interrupts.signal is not None:  # a DataLoader worker that died of the same signal
            raise stopped(run) from exc
        if interrupts.saved:
            also = f" (or the last epoch end: ckpt_path={last})" if last.is_file() else ""
            log.error("training crashed; continue with ckpt_path=%s%s", interrupts.saved, also)
        raise
    if trainer.interrupted:  # stopped without an exception we could see
        raise RunStopped(f"training was interrupted; resume with ckpt_path={last}", 1)


def stopped(run: Run) -> RunStopped:
    """The one line of a run stopped by a signal: where it stopped, and what to resume from."""
    trainer, interrupts, last = run.trainer, run.interrupts, run.ckpt_dir / "last.ckpt"
    if interrupts.saved:
        where = f"resume with ckpt_path={interrupts.saved}"
    elif last.is_file():  # the stop broke into a batch (or its checkpoint could not be written)
        where = f"resume from the last epoch end with ckpt_path={last}"
    else:
        where = "nothing was trained yet"
    return RunStopped(
        f"interrupted by {interrupts.signal.name} in epoch {trainer.current_epoch} "
        f"(step {trainer.global_step}); {where}",
        128 + int(interrupts.signal),
    )


def check_run_dir(ckpt_dir: Path, ckpt_path: str | None, restart: bool) -> None:
    """A run dir that holds checkpoints of an earlier run: resume it, or move them aside on request."""
    old = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not old or ckpt_path:
        return
    if not restart:
        raise UserError(
            f"{ckpt_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in old)}). Resume it with "
            f"ckpt_path={ckpt_dir / 'last.ckpt'}, or start fresh with restart=true (moves them aside)"
        )
    aside = ckpt_dir.with_name(f"checkpoints.{datetime.now():%Y%m%d-%H%M%S}")
    ckpt_dir.rename(aside)
    log.warning("restart=true: moved the earlier run's checkpoints to %s", aside)


def requeued_slurm_checkpoint(run_dir: Path) -> Path | None:
    """A requeued SLURM job's newest state: Lightning's `hpc_ckpt_N.ckpt`, or our interrupted/last checkpoint.

    The requeued job runs the same command in the same run dir, so this is what it continues from.
    """
    if not SLURMEnvironment.detect() or int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None  # a new job, not a requeued one: the run dir rules apply as everywhere
    ours = [run_dir / "checkpoints" / name for name in ("interrupted.ckpt", "last.ckpt")]
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(p for p in ours if p.is_file())]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    log.info("SLURM job %s was requeued: resuming from %s", os.environ.get("SLURM_JOB_ID", "?"), newest)
    return newest


def peak_rss_mb() -> float | None:
    """The largest resident set of this process so far, in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def find_lr(run: Run, cfg: DictConfig, run_dir: Path) -> float:
    """Lightning's LR range test; its suggestion becomes optimizer.lr, the plot goes to lr_find.png."""
    from lightning.pytorch.tuner import Tuner

    trainer = run.trainer
    lightning_log = logging.getLogger("lightning.pytorch.tuner.lr_finder")
    level = lightning_log.level
    lightning_log.setLevel(logging.CRITICAL)  # its "not enough points" error: the UserError below says why
    try:
        finder = Tuner(trainer).lr_find(
            run.model,
            datamodule=run.datamodule,
            min_lr=cfg.tune.min_lr,
            max_lr=cfg.tune.max_lr,
            num_training=cfg.tune.num_training,
            attr_name="lr",
            update_attr=True,
            early_stop_threshold=None,
        )
    finally:
        lightning_log.setLevel(level)
    steps = len(finder.results["lr"]) if finder is not None else 0
    if steps < LR_FIND_MIN_STEPS:
        raise UserError(lr_find_too_short(steps, int(cfg.tune.num_training), trainer))
    suggestion = finder.suggestion()
    if suggestion is None:
        raise UserError(
            f"the LR finder found no suggestion: the loss was not finite over tune.min_lr={cfg.tune.min_lr} .. "
            f"tune.max_lr={cfg.tune.max_lr}. Fix: lower tune.max_lr, or set optimizer.lr by hand (tune.lr_find=false)"
        )
    if trainer.is_global_zero:
        import matplotlib

        matplotlib.use("Agg")
        finder.plot(suggest=True).savefig(run_dir / "lr_find.png")
    log.info("LR finder suggests optimizer.lr=%.3g (plot: %s)", suggestion, run_dir / "lr_find.png")
    return float(suggestion)


# Lightning's suggestion skips the finder's first 10 steps and its last one, and needs 2 more to compare
LR_FIND_MIN_STEPS = 13


def lr_find_too_short(steps: int, num_training: int, trainer) -> str:
    """Why the LR finder ran too few steps for a suggestion, and what to do."""
    if num_training < LR_FIND_MIN_STEPS:
        return (
            f"the LR finder needs at least {LR_FIND_MIN_STEPS} steps for a suggestion and tune.num_training="
            f"{num_training}. Fix: tune.num_training=100 (the default), or set optimizer.lr by hand (tune.lr_find=false)"
        )
    batches = trainer.num_training_batches
    known = batches not in (None, float("inf"))
    per_epoch = f"{int(batches)} training batches an epoch" if known else "few batches"
    return (
        f"the data is too small for the LR finder: it has {per_epoch}, so the finder ran {steps} steps, and it "
        f"needs at least {LR_FIND_MIN_STEPS}. Fix: set optimizer.lr by hand (tune.lr_find=false), or give it more "
        "batches (more data, a larger data.train_subset, or a smaller data.batch_size)"
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    return run_cli(train, cfg)


if __name__ == "__main__":
    main()
