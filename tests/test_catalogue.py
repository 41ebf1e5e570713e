"""The bad-input catalogue: every command, given bad input, ends with one line and exit code 2.

Each entry of `ROWS` is `row(command, argv, says)`:
- `command`: a key of `MAINS` (`train -m` is the sweeper: the train entry, with `-m` put first);
- `argv`: the command line after the command, with `{placeholders}` filled per test: `{tmp}` the
  test's own folder (where the run writes, so it must end empty), `{inputs}` a folder of prepared bad
  files (`inputs`), `{ckpt}` a good checkpoint, `{port}` a free port, `{busy_port}` one in use;
- `says`: a fragment of the one line the command must print;
- optional: `details=True` for an error that prints its details (e.g. bad files) below the line,
  `xfail="why"` for a known defect (strict: the row fails once it is fixed, so it becomes a plain row).

Every row runs the command's console entry in this process (`helpers.run_main`), its run dir inside
`{tmp}` (`RUN_DIR`, else `HYDRA_DIRS`), and checks: exit code 2; stderr is the one `error: ...` line
holding `says` (and only the details below it); no traceback; and nothing left behind: `{tmp}` is
empty (no run dir with Hydra's records, no `*.tmp`) and `{inputs}` unchanged. A new case is one more
row; a new command is one more entry in `MAINS`.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

import httpx
import pytest
import torch
from helpers import run_main
from test_serve import TIMEOUT, png_bytes, server  # noqa: F401 - `server` is a fixture used below

from visiontune import compress, export, predict, preview, serve, train
from visiontune import eval as eval_command

LEGACY = Path(__file__).parent / "data" / "legacy_multiclass.ckpt"
MAINS = {
    "train": train.main,
    "train -m": train.main,
    "eval": eval_command.main,
    "predict": predict.main,
    "export": export.main,
    "serve": serve.main,
    "compress": compress.main,
    "preview": preview.main,
    "shard": preview.shard_main,
}
# where each command writes, inside {tmp}; any other command is a Hydra run or sweep
RUN_DIR = {"preview": ["--out", "{tmp}/preview.png"]}
HYDRA_DIRS = ["hydra.run.dir={tmp}/run", "hydra.sweep.dir={tmp}/sweep"]
FAST = ["data.train_subset=64", "data.val_subset=32", "data.test_subset=32", "data.image_size=32"]
SHARDS = ["data=shards", "model.backbone=timm:test_efficientnet", "model.pretrained=false"]


def row(command: str, argv: list[str], says: str, details: bool = False, xfail: str = ""):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(command, argv, says, details, marks=marks, id=f"{command}: {' '.join(argv)}")


ROWS = [
    # train
    row("train", ["data.image_size=-3"], "invalid config value data.image_size=-3"),
    row("train", ["max_cpu_hours=abc"], "invalid config value max_cpu_hours='abc'"),
    row("train", ["nosuchkey=1"], "Could not override 'nosuchkey'"),
    row("train", [*FAST, "model.backbone=nosuchnet"], "unknown backbone 'nosuchnet'"),
    row("train", [*FAST, "data=imagefolder", "data.root={tmp}/missing"], "missing does not exist"),
    row("train", [*FAST, "model.backbone=file:{tmp}/missing.pt@resnet18"], "weights file"),
    row("train", [*FAST, "ckpt_path={tmp}/missing.ckpt"], "missing.ckpt does not exist"),
    row("train", [*FAST, "ckpt_path={inputs}/dropout.ckpt"], "invalid stored setting model.head.dropout=5.0"),
    row("train", ["paths.output_dir=/proc/x"], "cannot create the run dir /proc/x"),
    # the sweeper
    row("train -m", ["nosuchkey=1,2"], "Could not override 'nosuchkey'"),
    row("train -m", ["data.image_size=-3,-4"], "invalid config value data.image_size=-3"),
    row("train -m", ["max_cpu_hours=abc,1"], "invalid config value max_cpu_hours='abc'"),
    row("train -m", ["hparams_search=optuna", "hydra.sweeper.pruner=average"], "is not a pruner"),
    row("train -m", ["hydra.sweep.dir=/proc/x/sweep", "seed=1,2"], "cannot create the sweep dir /proc/x/sweep"),
    # eval
    row("eval", [], "eval needs ckpt_path=<run dir>/checkpoints/best.ckpt"),
    row("eval", ["ckpt_path={tmp}/missing.ckpt"], "missing.ckpt does not exist"),
    row("eval", ["ckpt_path={inputs}/no_model.ckpt"], "is not a visiontune checkpoint (no 'model' settings)"),
    row("eval", ["ckpt_path={inputs}/image_size.ckpt"], "invalid stored setting data.image_size=-1"),
    row("eval", ["ckpt_path={inputs}/dropout.ckpt"], "invalid stored setting model.head.dropout=5.0"),
    row("eval", ["ckpt_path={ckpt}", "data.batch_size=0"], "invalid config value data.batch_size=0"),
    row("eval", ["ckpt_path={ckpt}", "paths.output_dir=/proc/x"], "cannot create the run dir /proc/x"),
    row("eval", ["ckpt_path={ckpt}", "hydra.run.dir=/proc/x/run"], "cannot create the run dir /proc/x/run"),
    row("eval", ["nosuchkey=1"], "Could not override 'nosuchkey'"),
    # predict
    row("predict", ["inputs={tmp}"], "predict needs ckpt_path=<run dir>/checkpoints/best.ckpt"),
    row("predict", ["ckpt_path={ckpt}"], "predict needs inputs="),
    row("predict", ["ckpt_path={ckpt}", "inputs={tmp}/missing"], "missing does not exist"),
    row("predict", ["ckpt_path={tmp}/missing.ckpt", "inputs={inputs}"], "missing.ckpt does not exist"),
    row("predict", ["ckpt_path={inputs}/dropout.ckpt", "inputs={inputs}"], "invalid stored setting model.head"),
    row("predict", ["ckpt_path={ckpt}", "inputs=split:train"], "the splits are split:test and split:val"),
    # export
    row("export", [], "export needs ckpt_path=<run dir>/checkpoints/best.ckpt"),
    row("export", ["ckpt_path={tmp}/missing.ckpt"], "missing.ckpt does not exist"),
    row("export", ["ckpt_path={inputs}/no_model.ckpt"], "is not a visiontune checkpoint (no 'model' settings)"),
    row("export", ["ckpt_path={inputs}/image_size.ckpt"], "invalid stored setting data.image_size=-1"),
    row("export", ["ckpt_path={ckpt}", "format=bogus"], "format=bogus is unknown"),
    # serve (its HTTP bad requests: the last test)
    row("serve", ["port={port}"], "give exactly one of ckpt_path=<best.ckpt>, model=<model.onnx> or adapters="),
    row("serve", ["ckpt_path={ckpt}", "port=99999"], "port=99999 is not a TCP port"),
    row("serve", ["ckpt_path={ckpt}", "port=abc"], "port=abc is not a TCP port"),
    row("serve", ["ckpt_path={ckpt}", "port={port}", "max_batch_size=abc"], "max_batch_size=abc must be a whole"),
    row("serve", ["ckpt_path={ckpt}", "port={port}", "batch_timeout=-1"], "batch_timeout=-1 must be a number"),
    row("serve", ["ckpt_path={ckpt}", "port={busy_port}"], "in use"),
    row("serve", ["ckpt_path={tmp}/missing.ckpt", "port={port}"], "missing.ckpt does not exist"),
    row("serve", ["ckpt_path={inputs}/no_model.ckpt", "port={port}"], "(no 'model' settings)"),
    row("serve", ["ckpt_path={inputs}/dropout.ckpt", "port={port}"], "invalid stored setting model.head"),
    row("serve", ["model={tmp}/missing.onnx", "port={port}"], "missing.onnx does not exist"),
    # compress
    row("compress", [], "compress needs ckpt_path=<run dir>/checkpoints/best.ckpt method=int8|prune"),
    row("compress", ["ckpt_path={ckpt}", "method=fp16"], "invalid config value method='fp16'"),
    row("compress", ["ckpt_path={tmp}/missing.ckpt", "method=int8"], "missing.ckpt does not exist"),
    row("compress", ["ckpt_path={inputs}/image_size.ckpt", "method=int8"], "invalid stored setting data.image_size"),
    # preview
    row("preview", ["--n", "0"], "--n 0: ask for at least one sample"),
    row("preview", ["nosuchkey=1"], "Could not override 'nosuchkey'"),
    row("preview", ["model.backbone=nosuchnet"], "unknown backbone 'nosuchnet'"),
    row("preview", ["data=imagefolder", "data.root={tmp}/missing"], "missing does not exist"),
    row("preview", ["data.image_size=-3"], "data.image_size=-3"),
    # shard, and data=shards (the shard sets of `inputs`)
    row("shard", [], "shard needs out=<folder for the shards>"),
    row("shard", ["data=shards", "data.root={inputs}/shards", "out={tmp}/out"], "visiontune-shard reads a dataset"),
    row("shard", [*FAST, "out={inputs}"], "is not empty and holds no shard set"),
    row("train", [*SHARDS, "data.root={inputs}/shards_missing"], "shards_missing/train/chunk-0-1.bin is missing"),
    row("train", [*SHARDS, "data.root={inputs}/shards_truncated"], "chunk-0-1.bin is truncated (100 of"),
    row("train", [*SHARDS, "data.root={inputs}/shards_foreign"], "a manifest from another source"),
    row("train", [*SHARDS, "data.root={inputs}/shards_unfinished"], "no manifest.json: an unfinished shard set"),
    row("train", [*SHARDS, "data.root={inputs}"], "holds no manifest.json: no shard set"),
    row("train", [*SHARDS, "data.root=s3://visiontune-offline/shards"], "cannot read s3://visiontune-offline/shards/"),
    row("train", [*SHARDS, "data.root=local:{inputs}/shards", "data.cache_dir={cache}", "data.cache_limit=1kB"],
        "data.cache_limit=1kB is smaller than one chunk"),
    row("train", [*SHARDS, "data.root={inputs}/shards", "data.image_size=32"], "were written at image_size=16"),
    row("eval", ["ckpt_path={ckpt}", "data.name=shards", "data.root={inputs}/shards_truncated"], "is truncated"),
]  # fmt: skip


def with_settings(path: Path, change) -> None:
    """The legacy checkpoint's settings, changed by `change(hparams)`, without its weights (they are
    never reached: the settings are refused first)."""
    checkpoint = torch.load(LEGACY, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {}
    change(checkpoint["hyper_parameters"])
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The prepared bad files that rows name as {inputs}/<name>."""
    folder = tmp_path_factory.mktemp("inputs")
    with_settings(folder / "no_model.ckpt", lambda h: h.pop("model"))
    with_settings(folder / "image_size.ckpt", lambda h: h["data"].update(image_size=-1))
    with_settings(folder / "dropout.ckpt", lambda h: h["model"]["head"].update(dropout=5.0))
    shard_sets(folder, tmp_path_factory.mktemp("shard_source"))
    return folder


def shard_sets(folder: Path, work: Path) -> None:
    """A good shard set and its broken copies: a chunk missing, a chunk truncated, another set's manifest, and
    a stopped writer's folder (no manifest)."""
    from test_shards import means_folder, write

    source = means_folder(work / "images")
    settings = [
        "data=imagefolder",
        f"data.root={source}",
        "data.image_size=16",
        "data.crop_pct=1.0",
        "chunk_bytes=4kB",
    ]
    write(work, folder / "shards", *settings)
    write(work, work / "other", *settings[:-1], "chunk_bytes=2kB")
    for name in ("missing", "truncated", "foreign", "unfinished"):
        shutil.copytree(folder / "shards", folder / f"shards_{name}")
    (folder / "shards_missing" / "train" / "chunk-0-1.bin").unlink()
    with open(folder / "shards_truncated" / "train" / "chunk-0-1.bin", "r+b") as chunk:
        chunk.truncate(100)
    shutil.copy(work / "other" / "manifest.json", folder / "shards_foreign" / "manifest.json")
    (folder / "shards_unfinished" / "manifest.json").rename(folder / "shards_unfinished" / "progress.json")


@pytest.fixture
def busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def left_behind(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(("command", "argv", "says", "details"), ROWS)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(command, argv, says, details, inputs, busy_port,
                                                          tmp_path, capsys):  # fmt: skip
    places = {"tmp": tmp_path, "inputs": inputs, "ckpt": LEGACY, "port": free_port(), "busy_port": busy_port,
              "cache": tmp_path.parent / f"{tmp_path.name}-cache"}  # fmt: skip
    where = RUN_DIR.get(command, HYDRA_DIRS)
    sweep = ["-m"] if command.endswith("-m") else []
    args = [a.format(**places) for a in (*sweep, *where, *argv)]
    before = left_behind(inputs)

    code = run_main(MAINS[command], *args)

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[0].startswith("error: ") and says in lines[0], err
    assert len(lines) > 1 if details else len(lines) == 1, err
    assert left_behind(tmp_path) == [], "bad input left files behind"
    assert left_behind(inputs) == before


def test_a_run_dir_that_held_files_before_is_never_removed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run")
    assert run_main(train.main, f"hydra.run.dir={run_dir}", "data.image_size=-3") == 2
    assert "data.image_size=-3" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run"
    assert (run_dir / ".hydra").is_dir()  # this run's records stay beside the earlier run's files


def test_an_output_dir_that_existed_stays(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code = run_main(eval_command.main, f"hydra.run.dir={tmp_path / 'run'}", f"paths.output_dir={out}")
    assert code == 2 and "eval needs ckpt_path=" in capsys.readouterr().err
    assert left_behind(tmp_path) == ["out"]


def test_a_folder_that_refuses_the_run_dir_is_one_line(tmp_path, monkeypatch, capsys):
    """As a read-only parent does (for any user, root included): mkdir there fails with EACCES."""
    locked = tmp_path / "locked"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    for where in (f"hydra.run.dir={locked / 'run'}", f"paths.output_dir={locked / 'out'}"):
        code = run_main(eval_command.main, f"ckpt_path={LEGACY}", f"hydra.run.dir={tmp_path}/run", where)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"cannot create the run dir {locked}" in err and "Permission denied" in err, err
    assert left_behind(tmp_path) == []


def test_an_os_error_of_the_task_itself_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only Hydra's own run dir setup becomes the run dir line; a fault inside a command stays a fault."""

    def broken(cfg):
        raise PermissionError(errno.EACCES, "a bug, not bad input", str(tmp_path / "x"))

    monkeypatch.setattr(eval_command, "evaluate", broken)
    code = run_main(eval_command.main, f"ckpt_path={LEGACY}", f"hydra.run.dir={tmp_path}/run")
    err = capsys.readouterr().err
    assert code == 1 and "a bug, not bad input" in err and "cannot create" not in err, err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_of_the_run_dir_is_one_line(tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    try:
        for where in (f"hydra.run.dir={parent / 'run'}", f"paths.output_dir={parent / 'out'}"):
            code = run_main(eval_command.main, f"ckpt_path={LEGACY}", f"hydra.run.dir={tmp_path}/run", where)
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and f"cannot create the run dir {parent}" in err, err
    finally:
        parent.chmod(0o700)
    assert left_behind(tmp_path) == ["locked"]


def test_a_bad_http_request_is_a_4xx_and_the_server_stays_up(server):  # noqa: F811 - the imported fixture
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        bad = client.post("/predict", content=b"this is not an image")
        assert 400 <= bad.status_code < 500 and "not an image" in bad.json()["error"]
        assert client.get("/health").json()["status"] == "ok"
        good = client.post("/predict", content=png_bytes(torch.zeros(28, 28, dtype=torch.uint8).numpy()))
        assert good.status_code == 200
