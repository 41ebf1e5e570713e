"""The run's own Lightning callbacks: checkpoints that are always current, interrupts, progress lines.

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
