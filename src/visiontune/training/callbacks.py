"""The run's own Lightning callbacks: checkpoints that are always current, interrupts, progress lines.

- `BestCheckpoint`: `best.ckpt`, Lightning's ModelCheckpoint whose best score and file survive a resume
  into another run dir (Hydra gives every run a new one).
- `LastCheckpoint`: `last.ckpt` at the end of every epoch, whatever the monitor says (Lightning's
  `save_last` only follows a new best). Lightning ends a run stopped by max_steps or early stopping
  through the epoch-end hooks too, so the run's final state is always saved.
- `SaveOnInterrupt`: SIGTERM, SIGINT or a crash mid-training saves a resumable checkpoint; an error
  before the first training step saves nothing (it is a setup error, not a lost run).
- `ResumeMidEpoch`: the position within the epoch, in every checkpoint, so that resume is exact.
- `RunClock`: counts the images and epochs trained in this process (so throughput after a resume is
  honest), and prints one plain line per epoch when stdout is not a terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from visiontune.data.datamodule import EpochShuffleSampler
from visiontune.errors import UserError

log = logging.getLogger("visiontune")


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments), whose best score and file survive a resume into any dir.

    Lightning restores the best score only when the resumed run writes into the same directory. In a new
    directory it keeps only the old path, so the first validation after the resume would always count as
    a new best, even a worse one, and the run would test those worse weights. Here the best score comes
    back too, and the earlier run's best file is copied into the new directory under its own name, so
    that the new run's best checkpoint is complete on its own and only a better epoch replaces it. The
    earlier run's files are never modified or removed. If that file is gone, the run says so and its best
    checkpoint is the best epoch of the resumed run.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._carried: tuple[str, object] | None = None  # (earlier best file, its score), until copied
        self._fitting = False

    @property
    def state_key(self) -> str:
        # Lightning's key for a ModelCheckpoint with these settings: checkpoints written before this
        # class existed still resume with their best score.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._fitting:
            # `trainer.test(ckpt_path=...)` restores the callbacks too: the state inside the tested file
            # (which may be the copy of an earlier run's) must not replace what this fit found
            return
        old_dir = state_dict.get("dirpath", self.dirpath)
        if old_dir == self.dirpath or state_dict.get("best_model_score") is None:
            super().load_state_dict(state_dict)
            return
        # Copied at the start of fit (the trainer, and so the process rank, is known there), before the
        # first validation can compare against it. Until then best_model_path is the earlier file.
        self.best_model_path = state_dict["best_model_path"]
        self._carried = (state_dict["best_model_path"], state_dict["best_model_score"])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._carry_over(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._carry_over(trainer)  # strategies that restore the callbacks after on_fit_start

    def _carry_over(self, trainer: L.Trainer) -> None:
        if self._carried is None:
            return
        old_path, score = self._carried
        self._carried = None
        if not old_path or not os.path.isfile(old_path):
            log.warning(
                "resuming: the earlier best checkpoint %s is gone; the best checkpoint of this run is its "
                "own best epoch",
                old_path or "(none)",
            )
            self.best_model_path = ""
            return
        target = os.path.join(self.dirpath, os.path.basename(old_path))
        if trainer.is_global_zero:
            os.makedirs(self.dirpath, exist_ok=True)
            partial = target + ".tmp"
            shutil.copyfile(old_path, partial)
            os.replace(partial, target)  # never a half-copied best checkpoint
        trainer.strategy.barrier("BestCheckpoint.carry_over")
        self.best_model_score = score
        self.best_model_path = self.kth_best_model_path = target
        self.kth_value = score
        self.best_k_models = {target: score}


class LastCheckpoint(ModelCheckpoint):
    """`checkpoints/last.ckpt`, rewritten at every epoch end (a run stopped early ends one too)."""

    def __init__(self, dirpath: Path):
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("dirpath", self.dirpath) != self.dirpath:
            return  # a resume into a new run dir: nothing to carry over (Lightning would warn that it cannot)
        super().load_state_dict(state_dict)


INTERRUPTS = {SIGTERMException: signal.SIGTERM, KeyboardInterrupt: signal.SIGINT}


class SaveOnInterrupt(L.Callback):
    """On an interrupt or a crash after training began, save the current state as a checkpoint.

    The checkpoint is exact: `ResumeMidEpoch` records how far into the epoch the run got, so a resume
    continues with the next unseen batch. Lightning's own OnExceptionCheckpoint also makes every later
    `fit(ckpt_path=None)` resume from `last.ckpt`, which would silently continue an old run.
    """

    def __init__(self, dirpath: Path):
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self.signal: signal.Signals | None = None
        self._sigint_pending = False
        self._previous_sigint = None

    # Ctrl-C raises KeyboardInterrupt wherever Python happens to be, e.g. between a BatchNorm update and
    # the optimizer step, which would leave a half-done batch in the checkpoint. Like Lightning does for
    # SIGTERM, the first SIGINT is only noted, and acted on before the next batch starts, when every
    # counter agrees that the previous batch is complete; a second one interrupts at once.
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._note_sigint)

    def _note_sigint(self, signum, frame) -> None:
        if self._sigint_pending:
            raise KeyboardInterrupt
        self._sigint_pending = True
        log.warning("SIGINT: stopping at the end of this batch (press Ctrl-C again to stop at once)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stop = self._sigint_pending
        if trainer.world_size > 1:  # every rank stops at the same batch, or one waits in a collective forever
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise KeyboardInterrupt

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.signal = next((s for t, s in INTERRUPTS.items() if isinstance(exception, t)), None)
        self._restore_sigint()
        if isinstance(exception, UserError):  # bad input (a full disk, bad data): nothing to save, no advice
            return
        if self.signal is None and trainer.world_size > 1:
            return  # a crash on one rank: the other ranks would never join the save's barrier
        if trainer.global_step == 0 and trainer.fit_loop.epoch_loop.batch_progress.current.completed == 0:
            return  # nothing trained yet: a setup error, or an interrupt before the first step
        path = self.dirpath / ("interrupted.ckpt" if self.signal else "on_exception.ckpt")
        try:
            trainer.save_checkpoint(path, weights_only=False)  # the full, resumable state
        except Exception as exc:  # a full disk must not hide the original error
            log.error("could not save %s: %s", path, exc)
            return
        self.saved = path


class ResumeMidEpoch(L.Callback):
    """Every checkpoint records how many batches of the current epoch are done; a resume skips them.

    The data order is a function of (seed, epoch) (`EpochShuffleSampler`), so skipping the first
    `completed * batch_size` indices of the epoch continues exactly where an interrupted run stopped.
    (Lightning's own loader-state hook is not used: it is skipped when `configure_optimizers` has
    already set up the data to count the steps.)
    """

    def __init__(self):
        self.completed = 0
        self._resume_at = 0
        self._batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._batches = int(trainer.num_training_batches)
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        ours = isinstance(sampler, EpochShuffleSampler)
        # Lightning made the loader's iterator before a resumed run's epoch was known. A loader with
        # worker processes has already drawn its first indices then (one without workers draws them
        # at the first batch), so such an iterator is made again once the epoch and the skip are set.
        stale = ours and sampler.epoch != trainer.current_epoch
        if ours:
            sampler.set_epoch(trainer.current_epoch)
        if self._resume_at:
            if ours:
                sampler.skip = self._resume_at * int(loader.batch_size)
                self.completed = self._resume_at
            else:  # e.g. a distributed sampler: the epoch starts over
                log.warning(
                    "resuming mid-epoch: this loader cannot skip ahead, epoch %d restarts",
                    trainer.current_epoch,
                )
        if ours and (stale or self._resume_at) and getattr(loader, "num_workers", 0) > 0:
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)  # a fresh iterator over the sampler as it is now
        self._resume_at = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.completed = batch_idx + 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.completed = 0

    def state_dict(self) -> dict:
        if self._resume_at:  # saved before training restarted (e.g. interrupted in the sanity check)
            return {"completed": self._resume_at}
        # a checkpoint taken at an epoch's end (or at its validation) starts the next epoch from its top
        return {"completed": self.completed if self.completed < self._batches else 0}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_at = int(state_dict.get("completed", 0))


class RunClock(L.Callback):
    """Images and epochs trained in this process, with one plain progress line per epoch if asked."""

    def __init__(self, print_lines: bool):
        self.print_lines = print_lines
        self.images = 0
        self.epochs = 0
        self.started = 0.0
        self._epoch_start = 0.0
        self._epoch_images = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch is not None:
            n = len(batch[0])
            self.images += n
            self._epoch_images += n

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1
        if not self.print_lines or not trainer.is_global_zero:
            return
        now = time.perf_counter()
        seconds = now - self._epoch_start
        done = trainer.current_epoch + 1
        left = max(0, (trainer.max_epochs or done) - done)
        metrics = trainer.callback_metrics
        shown = " ".join(
            f"{k} {float(metrics[k]):.4f}" for k in ("train/loss", "val/loss", "val/acc") if k in metrics
        )
        eta = (now - self.started) / max(self.epochs, 1) * left
        print(
            f"epoch {done}/{trainer.max_epochs}  {shown}  {self._epoch_images / max(seconds, 1e-9):.0f} img/s  "
            f"{seconds:.0f} s  ETA {format_seconds(eta)}",
            file=sys.stdout,
            flush=True,
        )


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
