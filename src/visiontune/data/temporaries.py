"""Files written under a temporary name first, and the temporaries a killed process left behind.

Every temporary of the package is named `.<final name>.<pid>@<host>.tmp` (a temporary folder ends the
same way), so whoever finds one knows which process wrote it. Before a command writes into a folder it
removes the temporaries there that no running process can still be writing (`remove_stale`), in one log
line:

- one of this host whose process is gone, or whose pid now belongs to a process started after the file
  was last written (the pid was reused), or that carries this process's own pid but is older than it;
- one named before the pid was part of the name (`.model.onnx.tmp`, `tmpab12cd.npy.tmp`) that is
  older than this process.

A temporary of a running process is never touched, nor one written on another host (a shared disk):
pids of another machine or container say nothing here, so that host's next run removes it.

`write_json` writes a JSON file the same way: to its temporary, then renamed over the old file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("visiontune")
HOST = re.sub(r"[^\w-]", "_", socket.gethostname().split(".")[0]) or "host"
OWNER = re.compile(r"\.(\d+)@([\w-]+)\.tmp$")  # .<pid>@<host>.tmp
OLD_PID = re.compile(r"\.(\d+)\.tmp$")  # .<pid>.tmp, as named before the host was part of it
CLOCK_SLACK_S = 2.0  # a process start time is known to the second (the kernel's boot time is whole seconds)


def owner_tag() -> str:
    """The end of this process's temporary names: `.<pid>@<host>.tmp`."""
    return f".{os.getpid()}@{HOST}.tmp"


def temp_path(path: str | Path) -> Path:
    """Where `path` is written before it is renamed into place: `.<name>.<pid>@<host>.tmp` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{owner_tag()}")


def process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None where the system does not say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return float(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, StopIteration):
        return None


STARTED = process_start(os.getpid()) or time.time()  # this process (else: when this module loaded)


def running_since(pid: int, mtime: float) -> bool:
    """Whether process `pid` runs and was already running at `mtime` (so it may have written then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        pass
    start = process_start(pid)
    return start is None or start <= mtime + CLOCK_SLACK_S


def last_written(path: Path) -> float:
    """The newest mtime of a file, or of a folder and everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def is_stale(path: Path) -> bool:
    """Whether no running process can still be writing the temporary `path` (see the module docstring)."""
    try:
        mtime = last_written(path)
    except OSError:
        return False  # gone already
    owner = OWNER.search(path.name)
    if owner:
        pid, host = int(owner[1]), owner[2]
        if host != HOST:
            return False
        if pid == os.getpid():
            return mtime < STARTED - CLOCK_SLACK_S  # an earlier process with this pid (a restarted container)
        return not running_since(pid, mtime)
    if mtime >= STARTED - CLOCK_SLACK_S:
        return False  # a name without its writer, written while this process runs: maybe a concurrent one
    old = OLD_PID.search(path.name)
    return not (old and running_since(int(old[1]), mtime))


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())


def remove_stale(folder: str | Path, patterns: Iterable[str], what: str) -> list[str]:
    """Remove the stale temporaries in `folder` whose names match `patterns` (globs); their names.

    Says so in one log line. One that cannot be removed (a read-only folder) stays, silently: the
    command's own write reports the folder.
    """
    folder = Path(folder)
    found = {p for pattern in patterns for p in folder.glob(pattern)} if folder.is_dir() else set()
    removed, freed = [], 0
    for path in sorted(found):
        if not is_stale(path):
            continue
        try:
            size = _size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path.name)
        freed += size
    if removed:
        log.info(
            "removed %d stale %s temporar%s (%.1f MB) that a killed run left in %s: %s",
            len(removed), what, "y" if len(removed) == 1 else "ies", freed / 1e6, folder, ", ".join(removed),
        )  # fmt: skip
    return removed


def write_json(path: str | Path, data, **dumps) -> None:
    """`json.dumps(data, **dumps)` into `path` atomically: a failure leaves the old file whole and no temporary."""
    path = Path(path)
    text = json.dumps(data, **dumps)  # a value that cannot be written fails here, before any file is touched
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
