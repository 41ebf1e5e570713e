"""Shared fixtures: Hydra-composed configs for tiny, fast runs; how the suite splits over worker processes.

`make test` runs the suite in pytest-xdist workers, one per core. Each worker, and every command a test
starts, then computes with one thread: two workers of two threads each on two cores would spin against
each other and run several times slower. A command a test starts is a process forked from its worker
(`helpers.run`), which has imported torch and Lightning already: a new interpreter would spend 5-8
CPU-seconds importing them again. Tests that start several processes of their own (DDP ranks,
which also share a rendezvous port) run one at a time (`serial`, a file lock). The signal tests need no
lock: the run signals itself at a chosen batch (tests/signal_run.py), whatever the load. What a session
trains once for many tests
(`shared_run`) is trained by one worker; the others wait for it and read the same files.
"""

from __future__ import annotations

import os

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:  # before torch is imported, so that the commands a test starts inherit it too
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"

import functools  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402
from helpers import TINY, compose_cfg, session_root, shared_run  # noqa: E402

torch.set_num_threads(1 if WORKER else max(1, min(2, os.cpu_count() or 1)))

# Tests that start DDP ranks (processes of their own, on a rendezvous port): never two at once.
SERIAL = ("ddp",)
# A test is `heavy` (left out of `make test-fast`) when it, or a fixture it uses, trains, fits, runs a
# command or a sweep, or starts a process: read from the source, so a new test is sorted without a list.
HEAVY = re.compile(
    r"(?<![\w.])(train|run|run_main|make_run|build_run|sweep|signalled_run|train_process|evaluate|train_tiny_checkpoint|"
    r"make_fashion_tasks|run_with|shared_run|getfixturevalue|export\w*|compress\w*|prune\w*)\(|\.fit\(|subprocess\.|Popen\("
)
# and these, by name (parameter ids included): big models built at random, large figures, every option
HEAVY_NAMES = ("vgg16", "vit_b_16", "100_classes", "export", "onnx")


@functools.cache
def trains(function) -> bool:
    try:
        return bool(HEAVY.search(inspect.getsource(function)))
    except (OSError, TypeError):
        return False


def is_heavy(item) -> bool:
    if trains(getattr(item, "function", None)) or any(word in item.name for word in HEAVY_NAMES):
        return True
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(trains(d.func) for defs in definitions.values() for d in defs)


def pytest_itemcollected(item):
    """Marks each test as it is collected, before any collection_modifyitems hook (pytest-xdist's reads
    the xdist_group marks there)."""
    name = getattr(item, "originalname", item.name)
    if any(word in name.lower() for word in SERIAL):
        item.add_marker(pytest.mark.serial)
    if is_heavy(item):
        item.add_marker(pytest.mark.heavy)


def pytest_collection_finish(session):
    """What collection built (the test modules, their items and imports) lives as long as the session:
    out of the cyclic collector's way, whose full passes would otherwise walk it again and again."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _one_at_a_time(request, tmp_path_factory):
    if request.node.get_closest_marker("serial") is None:
        yield
        return
    with FileLock(str(session_root(tmp_path_factory) / "serial.lock")):
        yield


@pytest.fixture
def tiny_cfg(tmp_path):
    """A composer: tiny_cfg(*overrides) -> cfg for a seconds-long run into tmp_path."""

    def make(*overrides: str):
        return compose_cfg([*TINY, *overrides], tmp_path)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """One tiny trained checkpoint (resnet18, 1 epoch) shared by the after-training tests."""
    from helpers import train_tiny_checkpoint

    return shared_run(tmp_path_factory, "tiny_run", train_tiny_checkpoint) / "checkpoints" / "best.ckpt"
