"""Temporaries: what a killed export, compress or cache build leaves is removed by the next run of it
(one log line), a running writer's file never is; metrics.json is written whole or not at all; an
export into a folder it cannot write is one line and exit code 2."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import run_main
from test_compress import compress_cfg
from test_export import export_cfg

from visiontune import compress as compress_module
from visiontune.compress import compress
from visiontune.data.cache import ArrayStore
from visiontune.data.temporaries import HOST, STARTED, remove_stale, temp_path, write_json
from visiontune.export import export
from visiontune.export import main as export_main

OLD = STARTED - 3600  # an mtime from before this process started


@pytest.fixture
def pids():
    """(a pid whose process has ended, the pid of a process that runs until the test ends)."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    running = subprocess.Popen(["sleep", "300"])
    yield ended.pid, running.pid
    running.kill()
    running.wait()


def plant(folder: Path, name: str, mtime: float | None = None, folder_kind: bool = False) -> Path:
    """A leftover temporary: a file (or a folder holding one) named `name`, optionally with an old mtime."""
    path = folder / name
    if folder_kind:
        path.mkdir(parents=True)
        (path / "model.onnx").write_bytes(b"\0" * 1000)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)
    if mtime is not None:
        for p in (path, *path.glob("*")):
            os.utime(p, (mtime, mtime))
    return path


def planted(folder: Path, ended: int, running: int, stem: str, folder_kind: bool = False) -> dict[str, Path]:
    """One temporary of each kind in `folder`, by what should happen to it."""
    return {
        "old name, old": plant(folder, f"{stem}.tmp", OLD, folder_kind),  # before pids were in the name
        "old name, fresh": plant(folder, f"{stem}.new.tmp", None, folder_kind),  # written after we started
        "ended pid": plant(folder, f"{stem}.{ended}@{HOST}.tmp", None, folder_kind),
        "running pid": plant(folder, f"{stem}.{running}@{HOST}.tmp", None, folder_kind),
        "other host": plant(folder, f"{stem}.{ended}@elsewhere.tmp", OLD, folder_kind),
    }


def check_swept(temps: dict[str, Path], caplog, what: str) -> None:
    gone = {kind for kind, path in temps.items() if not path.exists()}
    assert gone == {"old name, old", "ended pid"}
    lines = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(lines) == 1 and f"removed 2 stale {what} temporaries" in lines[0], lines
    assert temps["old name, old"].name in lines[0] and temps["ended pid"].name in lines[0]


def test_export_removes_the_temporaries_of_a_killed_export_and_keeps_a_running_ones(
    tiny_checkpoint, tmp_path, pids, caplog
):
    caplog.set_level(logging.INFO, logger="visiontune")
    temps = planted(tmp_path, *pids, stem=".model.onnx")
    export(export_cfg(tiny_checkpoint, tmp_path, "format=torchscript", "parity_images=8"), patch={})
    check_swept(temps, caplog, "export")
    assert (tmp_path / "model.torchscript.pt").is_file() and (tmp_path / "export.json").is_file()
    mine = [p.name for p in tmp_path.iterdir() if f".{os.getpid()}@" in p.name]
    assert mine == []  # its own temporaries were renamed into place


def test_compress_removes_the_folder_of_a_killed_compress_and_keeps_a_running_ones(
    tiny_checkpoint, tmp_path, pids, caplog, monkeypatch
):
    caplog.set_level(logging.INFO, logger="visiontune")
    temps = planted(tmp_path, *pids, stem=".compress-abc123", folder_kind=True)
    work = []

    def stop_in_work(cfg, model, datamodule, patch, folder):
        work.append(folder)
        raise RuntimeError("stopped after the sweep")

    monkeypatch.setitem(compress_module.METHODS, "int8", stop_in_work)
    with pytest.raises(RuntimeError, match="stopped after the sweep"):
        compress(compress_cfg(tiny_checkpoint, tmp_path, "method=int8"), patch={})
    check_swept(temps, caplog, "compress")
    assert work[0].name.endswith(f".{os.getpid()}@{HOST}.tmp") and not work[0].exists()


@pytest.mark.parametrize("write", ["save", "build"])  # the feature cache saves, the image cache builds
def test_a_cache_write_removes_the_temporaries_of_a_killed_one(write, tmp_path, pids, caplog):
    caplog.set_level(logging.INFO, logger="visiontune")
    ended, running = pids
    temps = {
        "old name, old": plant(tmp_path, "tmpk2j4x9.npy.tmp", OLD),  # NamedTemporaryFile, as named before
        "old name, fresh": plant(tmp_path, "tmpq8w1z3.npy.tmp"),
        "ended pid": plant(tmp_path, f".features-a.npy.{ended}@{HOST}.tmp"),
        "running pid": plant(tmp_path, f".features-a.npy.{running}@{HOST}.tmp"),
        "other host": plant(tmp_path, f".features-a.npy.{ended}@elsewhere.tmp", OLD),
    }
    store, array = ArrayStore(tmp_path, "feature cache"), np.arange(12, dtype=np.float16).reshape(3, 4)
    during = []
    if write == "save":
        store.save("features-b", array)
    else:

        def fill(out):
            out[:] = array
            during.extend(p.name for p in tmp_path.glob(f"*.{os.getpid()}@{HOST}.tmp"))

        store.build("features-b", array.shape, np.float16, fill)
        assert during == [f".features-b.npy.{os.getpid()}@{HOST}.tmp"]  # the writer's pid is in the name
    check_swept(temps, caplog, "feature cache")
    assert np.array_equal(store.load("features-b", np.float16), array)


def test_a_build_of_an_earlier_version_is_removed_once_its_process_is_gone(tmp_path, pids):
    """`<key>.npy.<pid>.tmp`, as the image cache named its builds before the host was in the name."""
    ended, running = pids
    gone = plant(tmp_path, f"images-a.npy.{ended}.tmp", OLD)
    kept = plant(tmp_path, f"images-a.npy.{running}.tmp")  # written while this process runs
    assert remove_stale(tmp_path, ["*.npy.*.tmp"], "image cache") == [gone.name]
    assert kept.exists() and not gone.exists()


# ---------------------------------------------------------------- metrics.json


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"val/acc": 0.5}, indent=2)
    write_json(path, {"val/acc": 0.75}, indent=2)
    assert json.loads(path.read_text()) == {"val/acc": 0.75} and os.listdir(tmp_path) == ["metrics.json"]


def test_a_value_json_cannot_write_leaves_the_old_metrics_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"val/acc": 0.5})
    with pytest.raises(TypeError):
        write_json(path, {"val/acc": 0.75, "model": object()})
    assert json.loads(path.read_text()) == {"val/acc": 0.5} and os.listdir(tmp_path) == ["metrics.json"]


def test_a_disk_that_fills_up_mid_write_leaves_the_old_metrics_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"val/acc": 0.5})
    real_write = Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"val/acc": 0.75, "test/acc": 0.7})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"val/acc": 0.5} and os.listdir(tmp_path) == ["metrics.json"]
    assert temp_path(path).name == f".metrics.json.{os.getpid()}@{HOST}.tmp"


# ---------------------------------------------------------------- export: an out_dir it cannot write


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_export_into_a_read_only_out_dir_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o500)
    try:
        code = run_main(
            export_main, f"ckpt_path={tiny_checkpoint}", f"out_dir={out}", f"hydra.run.dir={tmp_path}"
        )
        err = one_error_line(capsys)
        assert code == 2 and f"out_dir={out}" in err and "make it writable" in err
        assert "Permission denied" in err and list(out.iterdir()) == []
    finally:
        out.chmod(0o700)


def test_export_into_an_out_dir_that_is_a_file_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "model_dir"
    out.write_text("not a folder")
    code = run_main(
        export_main, f"ckpt_path={tiny_checkpoint}", f"out_dir={out}", f"hydra.run.dir={tmp_path}"
    )
    err = one_error_line(capsys)
    assert code == 2 and f"out_dir={out} is a file, not a folder" in err and "set out_dir=<a folder>" in err
    assert out.read_text() == "not a folder"
