"""Build the pieces of a run by hand, so tests can look inside the model between steps."""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing.process
import multiprocessing.util
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from visiontune.cli import CONF_DIR
from visiontune.data import ImageDataModule
from visiontune.models.backbones import backbone_data_config
from visiontune.training.finetune import ApplyFreeze
from visiontune.training.module import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
# Tiny everything: small subsets, small images, random init.
TINY = [
    "data.train_subset=64",
    "data.val_subset=32",
    "data.test_subset=32",
    "data.image_size=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "callbacks.progress.refresh_rate=0",
    "callbacks.curves=false",  # 0.2 s an epoch; test_train.py and test_curves_logs.py draw them
]


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


def data_config(size: int = 32, crop_pct: float = 0.875) -> dict:
    """A made-up backbone preprocessing (the datamodule's `data_config`): square `size`, mean and std 0.5."""
    return {
        "input_size": (3, size, size),
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "interpolation": "bilinear",
        "crop_pct": crop_pct,
    }


# make_run's data: 4 training steps an epoch, of 8 images each
DATA = {
    "name": "fashion_mnist",
    "root": "data",
    "train_subset": 32,
    "val_fraction": 0.1,
    "val_subset": 16,
    "test_subset": 16,
    "image_size": 32,
    "crop_pct": 1.0,
    "batch_size": 8,
    "num_workers": 0,
}


def make_run(
    finetune: dict,
    backbone: str = "resnet18",
    epochs: int = 1,
    optimizer: dict | None = None,
    scheduler: dict | None = None,
    callbacks: list | None = None,
    data: dict | None = None,
    **trainer_kwargs,
):
    """(trainer, model, datamodule, freeze callback) for a tiny run; nothing is fitted yet."""
    L.seed_everything(0, verbose=False)
    datamodule = ImageDataModule({**DATA, **(data or {})}, {"name": "none"}, backbone_data_config(backbone))
    model = ImageClassifier(
        model={"backbone": backbone, "pretrained": False},
        num_classes=10,
        optim={
            "optimizer": optimizer or {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
            "scheduler": scheduler or {"name": "none"},
            "finetune": finetune,
        },
        data=datamodule.cfg,
    )
    strategy = ApplyFreeze()
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer = L.Trainer(**{**defaults, **trainer_kwargs}, callbacks=[strategy, *(callbacks or [])])
    return trainer, model, datamodule, strategy


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, prefix: str = "") -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


# The tests' backbone: timm's test EfficientNet (0.1 M parameters, BatchNorm, six layer groups, random
# init) trains a tiny run in a fraction of a second. A test about one family's layers names its own.
SMALL = "timm:test_efficientnet"
MODEL = [f"model.backbone={SMALL}", "model.pretrained=false"]
FAST = [*TINY, *MODEL]


def run(
    module: str,
    *args: str,
    timeout: float = 600,
    env: dict | None = None,
    cwd: Path = ROOT,
    new_session: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m module args...` (or `python script.py args...` where `module` ends in .py) in cwd, its
    output captured: a process of its own, forked from this one.

    The fork starts where a new interpreter would be after its imports (torch and Lightning take 5-8
    CPU-seconds to import, and the suite starts about 30 commands), then behaves as `python -m` does:
    fresh stdio, logging, warning filters, signal handlers and exit handlers, the given environment, its
    own session if asked (`start_new_session`), and the exit code of `sys.exit` or of a signal. A test
    of what happens when the interpreter itself exits, or of a separate installation, starts a real one.
    The fork also inherits what earlier tests left in this process's modules: a test that leaves
    something behind (wandb's logger does) runs its command through here too.
    """
    argv = [sys.executable, *([module] if module.endswith(".py") else ["-m", module]), *args]
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        _run_forked(module, list(args), out, err, env, cwd, new_session)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(argv, timeout)
        time.sleep(0.02)
    texts = []
    for file in (out, err):
        file.seek(0)
        texts.append(file.read().decode(errors="replace"))
        file.close()
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), *texts)


def _run_forked(module, args, out, err, env, cwd, new_session) -> None:
    code = 1
    # The worker's objects, as the fork found them, out of the cyclic collector's reach: a new interpreter
    # has none of them, and a collection that walked them would copy every page it touched (copy on
    # write) of a worker grown over hundreds of tests, a third of a command's CPU time late in a session.
    gc.freeze()
    try:
        # as a DataLoader worker does: the parent's OpenMP threads did not survive the fork
        torch.set_num_threads(1)
        # as multiprocessing does in a process it starts: the parent's children and finalizers are not ours
        multiprocessing.process._children = set()
        multiprocessing.util._finalizer_registry.clear()
        multiprocessing.util._run_after_forkers()
        if new_session:
            os.setsid()
        for fd, file in ((1, out), (2, err)):
            os.dup2(file.fileno(), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGPIPE", "SIGCHLD"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter sets it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        atexit._clear()
        for handler in logging.root.handlers[:]:
            logging.root.removeHandler(handler)
        logging.root.setLevel(logging.WARNING)
        warnings.resetwarnings()  # the interpreter's defaults, not pytest's
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        GlobalHydra.instance().clear()
        script = module.endswith(".py")
        sys.argv = [module, *args]
        sys.path[0] = str(Path(module).resolve().parent) if script else str(cwd)
        if script:
            runpy.run_path(module, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:  # what the interpreter does at exit: wait for threads (their exit hooks stop pools), then atexit
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def session_root(tmp_path_factory) -> Path:
    """The folder every pytest-xdist worker of this session sees (each worker's tmp root is inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_run(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` once per test session, by whichever worker asks first; the folder, for every worker."""
    from filelock import FileLock

    root = session_root(tmp_path_factory)
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            folder.mkdir(parents=True, exist_ok=True)
            make(folder)
            done.touch()
    return folder


def run_main(main, *args: str) -> int:
    """A command's entry point in this process, as its console script runs it with `args`; the exit code.

    Bad input needs no new process (importing torch again takes seconds): the test reads stderr with
    capsys. Every command keeps one test that starts it for real.
    """
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = [main.__module__, *args]
    try:
        main()
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


class CrashAt(L.Callback):
    """Raises RuntimeError(message) as batch `batch` of epoch `epoch` starts: a crash mid-training."""

    def __init__(self, epoch: int = 1, batch: int = 2, message: str = "simulated crash"):
        self.epoch, self.batch, self.message = epoch, batch, message

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError(self.message)


# -- after training (eval report, predict, export, serve): one tiny checkpoint and small image files
def train_tiny_checkpoint(run_dir: Path) -> Path:
    """Train the tiny FAST run (random init, 1 epoch, Fashion-MNIST subsets) into run_dir; its best.ckpt."""
    from visiontune.train import train

    train(compose_cfg([*FAST, "logger=csv"], run_dir))
    return run_dir / "checkpoints" / "best.ckpt"


def fashion_mnist_test_images(n: int, start: int = 0):
    """n (28x28 uint8 array, label) pairs from the Fashion-MNIST test set."""
    from visiontune.data.standard import load_standard

    x, y = load_standard("fashion_mnist", Path("data"), train=False)
    return [(x[i, 0].numpy(), int(y[i])) for i in range(start, start + n)]


def write_images(folder: Path, n: int, suffix: str = ".png", start: int = 0) -> list[Path]:
    """n Fashion-MNIST test images as files in folder (PNG or JPEG by suffix)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (array, label) in enumerate(fashion_mnist_test_images(n, start)):
        path = folder / f"img{start + i:04d}_{label}{suffix}"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def make_fashion_tasks(out: Path, train: int, val: int, test: int) -> Path:
    """scripts/make_fashion_tasks.py at a small size into `out` (multitask/ and mosaic/ CSVs and images)."""
    result = run("scripts/make_fashion_tasks.py", "--out", str(out), "--train", str(train), "--val", str(val),
                 "--test", str(test))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return out
