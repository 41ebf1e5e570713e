"""`python tests/signal_run.py SIGNAL EPOCH BATCH [train overrides...]`: `visiontune-train`, whose run
signals its own process group at the end of batch BATCH of epoch EPOCH.

That is the signal Ctrl-C, `timeout`, SLURM or Kubernetes send (to every process of the group: the run
and its loader workers), at a step the test chooses instead of after a guessed delay: the signal tests
stay exact on a loaded machine, with epochs of a fraction of a second. The process makes its own group
first, so the signal never reaches the test that started it. Everything after the signal (the handlers,
the checkpoint, the resume line, the exit code) is the real command's.
"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L


class SignalAt(L.Callback):
    def __init__(self, signum: int, epoch: int, batch: int):
        self.signum, self.epoch, self.batch, self.sent = signum, epoch, batch, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.sent and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            self.sent = True
            os.killpg(os.getpgid(0), self.signum)


def main() -> None:
    name, epoch, batch, *overrides = sys.argv[1:]
    try:
        os.setpgid(0, 0)  # a group of its own (a session leader, started with start_new_session, has one)
    except PermissionError:
        pass
    assert os.getpgid(0) == os.getpid(), "the run must lead its own process group"

    import visiontune.train as command

    build_run = command.build_run
    signal_at = SignalAt(getattr(signal, name), int(epoch), int(batch))
    command.build_run = lambda cfg, ckpt_path=None, callbacks=(): build_run(
        cfg, ckpt_path, [*callbacks, signal_at]
    )
    sys.argv = ["visiontune-train", *overrides]
    command.main()


if __name__ == "__main__":
    main()
