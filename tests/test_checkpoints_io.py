"""Checkpoints: bad files are one clear line, nothing is ever unpickled as code (local or over HTTP),
and a failed save (full disk, read-only folder) leaves the previous checkpoint whole and no `.tmp`."""

from __future__ import annotations

import errno
import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from visiontune.errors import UserError
from visiontune.training.checkpoints import AtomicCheckpointIO, load_checkpoint, save_atomic

MARKER = "code_ran.marker"


def ours(epoch: int = 0) -> dict:
    """The structure of a visiontune checkpoint, without a training run."""
    return {
        "state_dict": {"head.weight": torch.full((2, 3), float(epoch))},
        "hyper_parameters": {"backbone": "resnet18", "num_classes": 2},
        "epoch": epoch,
        "global_step": 0,
        "pytorch-lightning_version": "2.5",
    }


class Custom:
    """Any class of its own: unpickling it means importing and running code."""


class RunsShell:
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


class TouchesFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def write_truncated(path: Path) -> None:
    torch.save(ours(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "missing": (lambda p: None, "does not exist"),
    "folder": (lambda p: p.mkdir(), "is a folder"),
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "truncated": (write_truncated, "truncated or corrupt"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(4096)), "not a PyTorch checkpoint"),
    "text": (lambda p: p.write_text("epoch: 3\n"), "not a PyTorch checkpoint"),
    "plain state dict": (lambda p: torch.save(torch.nn.Linear(3, 2).state_dict(), p), "plain state dict"),
    "a list": (lambda p: torch.save([torch.ones(2)], p), "not a checkpoint"),
    "no state_dict": (lambda p: torch.save({"model": {"w": 1}}, p), "no state_dict"),
    "no hyper_parameters": (lambda p: torch.save({"state_dict": {}}, p), "without hyper_parameters"),
    "custom class": (lambda p: torch.save({**ours(), "extra": Custom()}, p), "refusing to unpickle code"),
    "os.system": (lambda p: torch.save({**ours(), "extra": RunsShell()}, p), "refusing to unpickle code"),
    "legacy format with code": (
        lambda p: torch.save({"x": RunsShell()}, p, _use_new_zipfile_serialization=False),
        "refusing to unpickle code",
    ),
}


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_checkpoint_is_one_line_naming_the_file_and_what_it_is(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where RunsShell would touch its marker
    make, what = BAD[kind]
    path = tmp_path / "model.ckpt"
    make(path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and what in message, message
    with pytest.raises(UserError, match=what):  # the same through Lightning's resume path
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not (tmp_path / MARKER).exists()


def test_a_good_checkpoint_loads_from_a_path_a_string_and_a_file_url(tmp_path):
    path = tmp_path / "best.ckpt"
    torch.save(ours(epoch=3), path)
    for source in (path, str(path), f"file://{path}"):
        checkpoint = load_checkpoint(source)
        assert checkpoint["epoch"] == 3 and torch.equal(
            checkpoint["state_dict"]["head.weight"], torch.full((2, 3), 3.0)
        )


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path):
    """(folder, base URL): the folder served over HTTP on 127.0.0.1 while the test runs."""
    served = tmp_path / "served"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_remote_checkpoint_loads_with_weights_only_and_never_runs_code(http_dir, tmp_path):
    served, url = http_dir
    marker = tmp_path / "unpickled.marker"
    torch.save(ours(epoch=2), served / "good.ckpt")
    torch.save({**ours(), "payload": TouchesFile(marker)}, served / "crafted.ckpt")

    assert load_checkpoint(f"{url}/good.ckpt")["epoch"] == 2
    with pytest.raises(UserError, match="refusing to unpickle code") as info:
        load_checkpoint(f"{url}/crafted.ckpt")
    assert f"{url}/crafted.ckpt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="refusing to unpickle code"):
        AtomicCheckpointIO().load_checkpoint(f"{url}/crafted.ckpt", weights_only=False)
    assert not marker.exists()
    with pytest.raises(UserError, match="does not exist.*404"):
        load_checkpoint(f"{url}/nope.ckpt")


class Tiny(BoringModel):
    def __init__(self, width: int = 32):
        super().__init__()
        self.save_hyperparameters()


def tiny_trainer(root: Path, epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_lightning_resume_goes_through_the_safe_loader_locally_and_over_http(http_dir, tmp_path):
    served, url = http_dir
    trainer = tiny_trainer(tmp_path, epochs=1)
    trainer.fit(Tiny())
    trainer.save_checkpoint(served / "last.ckpt")
    assert not list(served.glob("*.tmp"))

    resumed = tiny_trainer(tmp_path, epochs=2)
    resumed.fit(Tiny(), ckpt_path=f"{url}/last.ckpt")
    assert resumed.global_step == 4  # 2 steps restored + 2 new ones

    marker = tmp_path / "unpickled.marker"
    torch.save(
        {**torch.load(served / "last.ckpt", weights_only=True), "x": TouchesFile(marker)}, served / "bad.ckpt"
    )
    for source in (served / "bad.ckpt", f"{url}/bad.ckpt"):
        with pytest.raises(UserError, match="refusing to unpickle code"):
            tiny_trainer(tmp_path, epochs=2).fit(Tiny(), ckpt_path=source)
    assert not marker.exists()


@pytest.fixture
def previous(tmp_path) -> tuple[Path, bytes]:
    """A `last.ckpt` from an earlier save, and its bytes."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_atomic(ours(epoch=1), path)
    return path, path.read_bytes()


def half_write_then(exc: BaseException):
    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoi")
        raise exc

    return save


FAILURES = {
    "torch full disk": (
        RuntimeError("[enforce fail at inline_container.cc:672] . basic_ios::clear: iostream error"),
        "disk full",
    ),
    "torch write failed": (
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
        "disk full",
    ),
    "ENOSPC": (OSError(errno.ENOSPC, "No space left on device"), "disk full (No space left on device)"),
    "EDQUOT": (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk full (Disk quota exceeded)"),
    "EROFS": (
        OSError(errno.EROFS, "Read-only file system"),
        "the folder is read-only (Read-only file system)",
    ),
    "EACCES": (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(failure, previous, monkeypatch):
    path, before = previous
    exc, what = FAILURES[failure]
    monkeypatch.setattr(torch, "save", half_write_then(exc))
    with pytest.raises(UserError) as info:
        AtomicCheckpointIO().save_checkpoint(ours(epoch=2), path)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"cannot write checkpoint {path}: {what}"), message
    assert "hydra.run.dir=" in message
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.tmp"))


def test_a_really_full_disk_under_torch_save(previous):
    """The `.tmp` is a link to /dev/full, which fails every write with ENOSPC: torch's own error."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    path, before = previous
    tmp = path.with_name(path.name + ".tmp")
    tmp.symlink_to("/dev/full")
    with pytest.raises(UserError, match="disk full") as info:
        save_atomic({**ours(epoch=2), "big": torch.zeros(100_000)}, path)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before and not tmp.is_symlink() and not tmp.exists()


def test_a_read_only_run_dir_when_creating_the_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UserError, match=r"read-only.*hydra\.run\.dir="):
        save_atomic(ours(), tmp_path / "new" / "last.ckpt")


def test_other_save_errors_propagate_unchanged_and_leave_no_tmp(previous, monkeypatch):
    path, before = previous
    monkeypatch.setattr(torch, "save", half_write_then(TypeError("cannot pickle 'generator' object")))
    with pytest.raises(TypeError, match="generator"):
        save_atomic(ours(epoch=2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and not list(path.parent.glob("*.tmp"))


def test_a_successful_save_replaces_the_file_and_leaves_no_tmp(previous):
    path, _ = previous
    AtomicCheckpointIO().save_checkpoint(ours(epoch=5), path)
    assert load_checkpoint(path)["epoch"] == 5
    assert not list(path.parent.glob("*.tmp"))
