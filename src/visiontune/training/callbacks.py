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
  honest), and prints one plain line per epoch when stdout is not a terminal (its img/s: training only).
- `StepLogInterval`: a short run logs step scalars too (`log_every_n_steps` at most one epoch's steps).
- `TrainingCurves`: `curves.png` in the run dir (losses, metrics, LRs by epoch), redrawn at every epoch end.
- `ReadCheck`: no false success on data that breaks mid-run. An epoch (training or validation) or the
  test that reads too few of its images ends the run in one line, before its metrics are logged or its
  checkpoints written; an empty split is refused before anything trains.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from visiontune.data.datamodule import EpochShuffleSampler
from visiontune.data.temporaries import temp_path
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

    def _stopping_on(self, trainer: L.Trainer) -> signal.Signals | None:
        """The signal this process is stopping on, before it has reached the end of its batch."""
        if trainer.received_sigterm:
            return signal.SIGTERM
        return signal.SIGINT if self._sigint_pending else None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.signal = next((s for t, s in INTERRUPTS.items() if isinstance(exception, t)), None)
        self._restore_sigint()
        if self.signal is None and worker_died(exception):
            # a DataLoader worker died while this process was stopping (it got the signal too, before it
            # could ignore it): the stop goes on, as the interrupt it is
            self.signal = self._stopping_on(trainer)
            progress = trainer.fit_loop.epoch_loop.batch_progress.current
            if self.signal and progress.started > progress.completed:
                return  # it broke into a batch: a half-done step is no state to resume from
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


def worker_died(exception: BaseException) -> bool:
    """Whether `exception` is PyTorch's report of a DataLoader worker process that died, or what reading
    from its closed pipe raises when the worker dies before PyTorch notices (EOFError, a reset connection)."""
    if isinstance(exception, EOFError | ConnectionResetError | BrokenPipeError):
        return True
    return isinstance(exception, RuntimeError) and "DataLoader worker (pid" in str(exception)


class ResumeMidEpoch(L.Callback):
    """Every checkpoint records how many batches of the current epoch are done; a resume skips them.

    The data order is a function of (seed, epoch) (`EpochShuffleSampler`), and each rank's part of it a
    function of its rank, so skipping the first `completed * batch_size` indices of this rank's part
    continues exactly where an interrupted run stopped, on every rank (DDP steps together: every rank has
    done the same number of batches). Each image's augmentation is seeded from (seed, epoch, index), so
    the images after the resume are also augmented as they would have been.
    (Lightning's own loader-state hook is not used: it is skipped when `configure_optimizers` has
    already set up the data to count the steps.)
    """

    def __init__(self):
        self.completed = 0
        self._resume_at = 0
        self._batches = 0
        self._layout: dict = {}  # the world size and batch size the position counts in
        self._saved_layout: dict = {}

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
        self._layout = {"world_size": int(trainer.world_size), "batch_size": int(loader.batch_size or 0)}
        if self._resume_at and self._saved_layout and self._saved_layout != self._layout:
            log.warning(
                "resuming mid-epoch with %s, but the checkpoint counted its position with %s: the rest of epoch %d "
                "is split otherwise, so some of its images are read twice or not at all",
                self._layout, self._saved_layout, trainer.current_epoch,
            )  # fmt: skip
        if self._resume_at:
            if ours:
                sampler.skip = self._resume_at * int(loader.batch_size)
                self.completed = self._resume_at
            else:  # a loader of another kind: the epoch starts over
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
            return {"completed": self._resume_at, **self._saved_layout}
        # a checkpoint taken at an epoch's end (or at its validation) starts the next epoch from its top
        return {"completed": self.completed if self.completed < self._batches else 0, **self._layout}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_at = int(state_dict.get("completed", 0))
        self._saved_layout = {k: state_dict[k] for k in ("world_size", "batch_size") if k in state_dict}


class RunClock(L.Callback):
    """Images and epochs trained in this process, with one plain progress line per epoch if asked.

    The line's img/s is the training throughput: the epoch's images over the time of its training batches
    (each from the end of the one before, of the epoch's start, or of a validation), so that validation
    and the epoch-end work (checkpoints, curves) do not count. Its seconds are the whole epoch's.
    `clock` is the time source (seconds).
    """

    def __init__(self, print_lines: bool, clock: Callable[[], float] = time.perf_counter):
        self.print_lines = print_lines
        self.clock = clock
        self.images = 0
        self.epochs = 0
        self.started = 0.0
        self._epoch_start = 0.0
        self._epoch_images = 0
        self._train_seconds = 0.0  # of this epoch's training batches
        self._mark = 0.0  # where the next batch's time starts

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = self.clock()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._mark = self.clock()
        self._epoch_images = 0
        self._train_seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        self._train_seconds += now - self._mark
        self._mark = now
        if batch is not None:
            n = len(batch[0])
            self.images += n
            self._epoch_images += n

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # a validation within the epoch: the next batch starts after it
            self._mark = self.clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1
        if not self.print_lines or not trainer.is_global_zero:
            return
        now = self.clock()
        seconds = now - self._epoch_start
        done = trainer.current_epoch + 1
        left = max(0, (trainer.max_epochs or done) - done)
        metrics = trainer.callback_metrics
        shown = " ".join(
            f"{k} {float(metrics[k]):.4f}" for k in ("train/loss", "val/loss", "val/acc") if k in metrics
        )
        eta = (now - self.started) / max(self.epochs, 1) * left
        print(
            f"epoch {done}/{trainer.max_epochs}  {shown}  {self._epoch_images / max(self._train_seconds, 1e-9):.0f} "
            f"img/s  {seconds:.0f} s  ETA {format_seconds(eta)}",
            file=sys.stdout,
            flush=True,
        )


class StepLogInterval(L.Callback):
    """Step scalars in every run: `log_every_n_steps` becomes at most one epoch's optimizer steps.

    Lightning logs the step values (train/loss_step, the LR monitor's) every `log_every_n_steps` optimizer
    steps of the run, so a run with fewer steps than that would log none. The configured value stays
    the largest interval. Set when training starts, once the number of batches is known.
    """

    def __init__(self):
        self.configured: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.configured is None:
            self.configured = int(trainer.log_every_n_steps)
        batches = trainer.num_training_batches
        if self.configured > 0 and 0 < batches < float("inf"):
            steps = math.ceil(batches / max(1, int(trainer.accumulate_grad_batches)))
            if trainer.max_steps > 0:  # a run shorter than one epoch
                steps = min(steps, trainer.max_steps)
            trainer.log_every_n_steps = min(self.configured, steps)


class TrainingCurves(L.Callback):
    """`curves.png` in the run dir, drawn again at every epoch end, so that a running job can be looked at.

    Three panels by epoch: the train and val losses; the metrics (each stage's top-level ones, such as
    val/acc, val/map or val/score, and the monitor, whichever it is); the LR of each optimizer group
    (groups whose LRs are the same throughout share a line). The values are the epoch's, from
    `trainer.callback_metrics`: the val ones as its last validation left them, so an epoch that did
    not validate has no val point. Rank 0 draws, into a temporary file renamed over the old one. The
    epochs so far are part of every checkpoint, so the curves of a resumed run start at its epoch 1.
    """

    def __init__(self, path: Path, monitor: str):
        self.path = Path(path)
        self.monitor = monitor
        self.epochs: list[dict[str, float]] = []  # per epoch: "epoch", metric names and "lr/<group>"
        self._val: dict[str, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._val = epoch_scalars(trainer.callback_metrics, "val/", self.monitor)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:
            return
        epoch = trainer.current_epoch + 1
        row = {"epoch": epoch, **epoch_scalars(trainer.callback_metrics, "train/", self.monitor), **self._val}
        for i, group in enumerate(trainer.optimizers[0].param_groups if trainer.optimizers else ()):
            name = str(group.get("name", i))
            if not name.endswith(".no_decay"):  # a twin of its group, at the same LR
                row[f"lr/{name}"] = float(group["lr"])
        self._val = {}
        self.epochs = [r for r in self.epochs if r["epoch"] < epoch] + [row]
        if trainer.is_global_zero:
            try:
                draw_curves(self.epochs, self.path, self.monitor)
            except OSError as exc:  # a plot is no reason to stop training
                log.warning("could not write %s: %s", self.path, exc)

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))


def epoch_scalars(metrics: dict, stage: str, monitor: str) -> dict[str, float]:
    """The `stage` ("train/", "val/") values of `metrics` that the curves show: the top-level names
    (`val/acc`, not a head's `val/<head>/acc`, nor Lightning's `_step`/`_epoch` copies) and the monitor."""
    out = {}
    for name, value in metrics.items():
        top = name.count("/") == 1 and not name.endswith(("_step", "_epoch"))
        if name.startswith(stage) and (top or name == monitor):
            out[name] = float(value)
    return out


# more LR lines than this are coloured input -> output, and only the first and the last are named
MANY_LR_LINES = 8


def draw_curves(epochs: list[dict[str, float]], path: Path, monitor: str) -> None:
    """Write `path` (PNG): losses, metrics and LRs by epoch, one panel each; through a temporary file."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = list(dict.fromkeys(k for row in epochs for k in row if k != "epoch"))  # LRs in group order
    lrs = [k for k in names if k.startswith("lr/")]
    losses = sorted(k for k in names if k not in lrs and k.endswith("loss"))
    metrics = sorted(k for k in names if k not in lrs and k not in losses)
    panels = (
        ("loss", [(k, k) for k in losses]),
        ("metrics", [(k + (" (monitor)" if k == monitor else ""), k) for k in metrics]),
        ("learning rate", shared_lines(epochs, lrs)),
    )
    figure = Figure(figsize=(15, 3.6), dpi=80)
    FigureCanvasAgg(figure)
    for ax, (title, lines) in zip(figure.subplots(1, 3), panels, strict=True):
        colours: dict[str, str] = {}  # train/acc and val/acc: one colour, dashed and solid
        many = len(lines) > MANY_LR_LINES
        for i, (label, key) in enumerate(lines):
            points = [(row["epoch"], row[key]) for row in epochs if key in row]
            if many:  # "_" labels stay out of the legend
                colour, label = (
                    colormaps["viridis"](i / (len(lines) - 1)),
                    label if i in (0, len(lines) - 1) else "_",
                )
            else:
                colour = colours.setdefault(key.partition("/")[2], f"C{len(colours)}")
            ax.plot(
                [epoch for epoch, _ in points],
                [value for _, value in points],
                marker="o",
                markersize=3,
                color=colour,
                linestyle="--" if key.startswith("train/") else "-",
                linewidth=2.2 if key == monitor else 1.2,
                label=label,
            )
        if lines and title == "learning rate":  # the group names are long: beside the panel
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        elif lines:
            ax.legend(fontsize=7, framealpha=0.7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if lrs and all(row[k] > 0 for row in epochs for k in lrs if k in row):
        figure.axes[2].set_yscale("log")
    figure.subplots_adjust(left=0.04, right=0.77, bottom=0.14, top=0.9, wspace=0.22)
    partial = temp_path(path)
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def shared_lines(epochs: list[dict[str, float]], keys: list[str]) -> list[tuple[str, str]]:
    """(label, key) per line of the LR panel: the groups whose LRs are the same in every epoch share one,
    labelled by their first and last names and their number. A long name is cut to its index part
    (`backbone.5:blocks.4+bn2+conv_head` -> `backbone.5`)."""
    shared: dict[tuple, list[str]] = {}
    for key in keys:
        shared.setdefault(tuple(row.get(key) for row in epochs), []).append(key)
    lines = []
    for group in shared.values():
        names = [key.removeprefix("lr/") for key in group]
        if len(names) == 1:
            label = names[0] if len(names[0]) <= 36 else short_name(names[0])
        else:
            label = f"{short_name(names[0])} .. {short_name(names[-1])} ({len(names)} groups)"
        lines.append((label, group[0]))
    return lines


def short_name(group: str) -> str:
    """A group name for a legend: `backbone.5:blocks.4+bn2` -> `backbone.5`; at most 24 characters."""
    name = group.partition(":")[0]
    return name if len(name) <= 24 else name[:22] + ".."


class ReadCheck(L.Callback):
    """Every training and validation epoch, and the test, reads at least `min_fraction` of the images it
    asks its loader for, and at least one; otherwise the run ends with a UserError that names the split,
    the epoch and the counts.

    An image file that cannot be read mid-run is skipped (`data.files.collate_skip_none`; the feature
    cache skips its NaN rows alike), so its batch comes out shorter, or as None when every file of it
    failed. Without this check a run whose files broke would train on nothing, log the last measured
    metrics again as new ones, and exit 0. Batch `b` of a pass asks for `min(batch_size, n - b * batch_size)`
    images, `n` being the loader's sampler length: this counts only the batches that run, so
    limit_*_batches, max_steps and a mid-epoch resume (whose batch indices go on from where it stopped)
    ask for what they read. Under DDP each rank counts its own share (the sampler's length per rank) and
    the counts are summed over the ranks, which all decide alike. The sanity check is not counted.

    Hook order: the training count is checked after the epoch's last training batch, before its
    validation runs; the validation and test counts in `on_*_epoch_end`, which Lightning calls before it
    logs the epoch's metrics and before ModelCheckpoint saves (checkpoint callbacks come last). So a
    broken epoch logs no metrics and writes no checkpoint: `last.ckpt` stays that of the last good epoch.

    At the start of fit (and of test) the datamodule's splits must have images
    (`ImageDataModule.check_splits`): the test split only when `test` says the run will test.
    """

    def __init__(self, min_fraction: float, ckpt_dir: Path, test: bool = True):
        self.min_fraction = float(min_fraction)
        self.ckpt_dir = Path(ckpt_dir)
        self.test = test
        self._read = {"train": 0, "val": 0, "test": 0}
        self._asked = {"train": 0, "val": 0, "test": 0}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check = getattr(trainer.datamodule, "check_splits", None)
        if check is None:
            return
        if stage == "fit":
            validates = trainer.limit_val_batches != 0
            check(("train", *(("val",) if validates else ()), *(("test",) if self.test else ())))
        elif stage == "test":
            check(("test",))

    # -- counting
    def _reset(self, split: str) -> None:
        self._read[split] = self._asked[split] = 0

    def _count(self, split: str, loader, batch, batch_idx: int) -> None:
        read = 0 if batch is None else len(batch[0])
        self._read[split] += read
        size = getattr(loader, "batch_size", None)
        try:
            n = len(loader.sampler)
        except (AttributeError, TypeError):  # no sampler length: what was read is all it asked for
            n = size = None
        self._asked[split] += read if not size else max(0, min(size, n - batch_idx * size))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count("train", trainer.train_dataloader, batch, batch_idx)
        max_steps = trainer.max_steps
        last = batch_idx + 1 >= trainer.num_training_batches or 0 < max_steps <= trainer.global_step
        if last:  # before the epoch's validation runs
            self._check("train", trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check("train", trainer, pl_module)  # an epoch ended in another way (every rank calls this)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset("val")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking:
            self._count("val", _loader(trainer.val_dataloaders, dataloader_idx), batch, batch_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._check("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset("test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("test", _loader(trainer.test_dataloaders, dataloader_idx), batch, batch_idx)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._check("test", trainer, pl_module)

    # -- the check
    def _check(self, split: str, trainer, pl_module) -> None:
        read, asked = self._read[split], self._asked[split]
        if trainer.world_size > 1:  # every rank takes part, so every rank decides alike
            counts = torch.tensor([read, asked], dtype=torch.float64, device=pl_module.device)
            read, asked = (int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        if asked == 0 or (read > 0 and read >= self.min_fraction * asked):
            return
        if split == "test":
            when, best = "when testing", self.ckpt_dir / "best.ckpt"
            then = f"test it with visiontune-eval ckpt_path={best}" if best.is_file() else "test again"
        else:
            when, last = f"in epoch {trainer.current_epoch}", self.ckpt_dir / "last.ckpt"
            then = f"resume from the last good epoch with ckpt_path={last}" if last.is_file() else "run again"
        short = "none of them" if read == 0 else f"under data.min_read_fraction={self.min_fraction:g}"
        raise UserError(
            f"data: the {split} split read {read} of {asked} images {when} ({short}): its image files became "
            f"unreadable during the run. Fix or replace them, then {then}"
        )


def _loader(loaders, index: int):
    """Loader `index` of a trainer's evaluation loaders (one loader, or a list of them)."""
    return loaders[index] if isinstance(loaders, list | tuple) else loaders


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
