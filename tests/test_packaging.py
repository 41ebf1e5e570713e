"""Packaging: a non-editable wheel carries its configs, and its commands work from any directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import FAST, ROOT

# Runs each console script file (the wrapper pip wrote) with its arguments, one after the other; stops at
# the first that exits non-zero.
RUN_SCRIPTS = """
import json, runpy, sys
from hydra.core.global_hydra import GlobalHydra
for script, *args in json.loads(sys.argv[1]):
    GlobalHydra.instance().clear()
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
"""


def sh(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"
    return result


@pytest.mark.slow
def test_the_wheel_installs_and_its_commands_run_from_another_directory(tmp_path):
    # build from a clean copy of the sources: an in-tree build/ directory could carry stale modules
    source = tmp_path / "source"
    top_level = {"build", "outputs", "multirun", "data", "lightning_logs"}

    def skip(folder, names):
        return [n for n in names if n.startswith(".") or n == "__pycache__" or n.endswith(".egg-info")] + (
            [n for n in names if n in top_level] if Path(folder) == ROOT else []
        )

    shutil.copytree(ROOT, source, ignore=skip)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    sh(*pip_wheel, "-w", tmp_path / "dist", source)
    wheel = next((tmp_path / "dist").glob("visiontune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "the LICENSE is not in the wheel"
    assert "visiontune/deploy/page/index.html" in names  # serve's try-it page
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # reuse this environment's dependencies (torch, lightning, ...), but not its editable visiontune
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = sh(python, "-c", "import visiontune; print(visiontune.__file__)", cwd=elsewhere).stdout
    assert where.startswith(str(site)), where

    # the three console scripts, as the shell runs them, in one interpreter of the venv (each new one
    # would import torch and Lightning again)
    bin_dir = venv / "bin"
    ckpt = elsewhere / "run" / "checkpoints" / "best.ckpt"
    commands = [
        [bin_dir / "visiontune-train", *FAST, "logger=csv", "hydra.run.dir=run"],
        [bin_dir / "visiontune-eval", f"ckpt_path={ckpt}", "hydra.run.dir=eval"],
        [
            bin_dir / "visiontune-augment-preview",
            "augment=flip",
            "data.image_size=32",
            "--n",
            "4",
            "--out",
            "grid.png",
        ],
    ]
    sh(python, "-c", RUN_SCRIPTS, json.dumps([[str(part) for part in command] for command in commands]),
       cwd=elsewhere)  # fmt: skip
    metrics = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert "test/acc" in metrics
    again = json.loads((elsewhere / "eval" / "metrics.json").read_text())
    assert again["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert (elsewhere / "grid.png").stat().st_size > 0
