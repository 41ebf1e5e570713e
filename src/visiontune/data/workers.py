"""What every DataLoader worker process does first: leave SIGINT and SIGTERM to the main process.

Ctrl-C, `timeout`, SLURM and Kubernetes signal the whole process group, so the workers get the signal
too. By default a worker dies of it (PyTorch's worker handler re-raises a SIGTERM that its parent did
not send), the main process then fails on the dead worker in the middle of its batch, and the run ends
with a traceback instead of an interrupt checkpoint. A worker that ignores both signals keeps serving
batches; the main process stops at the end of its batch, saves, and shuts its loaders down (it tells
the workers to stop; it does not signal them).

`ignore_interrupts` is the `worker_init_fn` of every DataLoader in the package. Lightning adds its own
worker seeding only to a loader without one, so it is chained here whenever Lightning asked for it
(`seed_everything(workers=True)`), and the workers draw the same random numbers as before.

One place does signal the workers: at exit, multiprocessing sends SIGTERM to every daemonic child still
running (the workers of a loader that was never shut down, e.g. one that an exception's traceback still
holds) and then waits for each of them, with no time limit. A worker that ignores SIGTERM would keep
that wait going forever, so `_end_children_at_exit` runs first: the same SIGTERM, then a SIGKILL for a
child that is still there a second later. (PyTorch also sends SIGTERM to a worker that has not stopped
5 s after it was told to, a hung one: that worker now stays until the main process exits.)
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # loaded first: its exit handler is registered before ours
import os
import signal
import threading
import time

EXIT_GRACE_S = 1.0  # how long a child has at exit to end on SIGTERM before it is killed


def ignore_interrupts(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: ignore SIGINT and SIGTERM (and SLURM's SIGUSR1, whose Lightning
    handler a forked worker inherits: it would save a stale copy of the model and requeue the job),
    then seed as Lightning would."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):  # SIGUSR1: not on Windows
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)  # the process rank: Lightning's own, inherited from the parent


def _end_children_at_exit() -> None:
    """multiprocessing's own end of its daemonic children (see the module docstring), with a time limit."""
    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would report its workers as crashed
    for child in children:
        child.terminate()
    deadline = time.monotonic() + EXIT_GRACE_S
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


# atexit runs the last registered first: this runs before multiprocessing's handler waits for the children
atexit.register(_end_children_at_exit)
