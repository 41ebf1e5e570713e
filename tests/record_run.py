"""`python tests/record_run.py [train overrides...]`: `visiontune-train` with two test hooks, set by the
environment so that the argv stays the run's own (Lightning starts DDP's other ranks with this script
and the same argv, and torchrun starts each node's process with it):

- RECORD_DIR: each rank writes `rank<global rank>.json`: per epoch, the mean of every training image it
  read (the tests' images have distinct means that a flip keeps: a mean names its image);
- MID_AT=EPOCH,BATCH: every rank saves `<run>/checkpoints/mid.ckpt` together at the end of that batch, and
  the run goes on: one run gives both the uninterrupted weights and a mid-epoch checkpoint to resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L


class Record(L.Callback):
    def __init__(self, folder: str | None, mid: str | None):
        self.folder = Path(folder) if folder else None
        self.mid = tuple(int(x) for x in mid.split(",")) if mid else None
        self.seen: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.folder is not None:
            means = batch[0].float().mean(dim=(1, 2, 3)).tolist()
            self.seen.setdefault(trainer.current_epoch, []).extend(round(m, 4) for m in means)
        if self.mid == (trainer.current_epoch, batch_idx):
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "mid.ckpt")

    def on_train_end(self, trainer, pl_module):
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def main() -> None:
    import visiontune.train as command

    build_run = command.build_run
    hook = Record(os.environ.get("RECORD_DIR"), os.environ.get("MID_AT"))
    command.build_run = lambda cfg, ckpt_path=None, callbacks=(): build_run(
        cfg, ckpt_path, [*callbacks, hook]
    )
    command.main()


if __name__ == "__main__":
    main()
