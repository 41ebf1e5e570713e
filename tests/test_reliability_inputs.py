"""Hostile inputs: pixel bombs refused before decoding, names that are not UTF-8, damaged caches, odd paths.

A pixel bomb here is a PNG of 12000 x 12000 one-bit pixels: 17 KB on disk, 430 MB once decoded to RGB.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_serve
import torch
from helpers import FAST, ROOT, compose_cfg, fashion_mnist_test_images, run_main, write_images
from PIL import Image
from test_data_cache import datamodule, folder
from test_features import probe

from visiontune.config import validate_config
from visiontune.data.cache import files_fingerprint
from visiontune.data.files import drop_bad_files
from visiontune.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, open_image
from visiontune.errors import UserError
from visiontune.predict import predict, write_rows
from visiontune.serve import BadRequest, decode

server = test_serve.server  # the tiny checkpoint's service (max_bytes 50 KB), one per module
SIDE = 12000
NOT_UTF8 = b"caf\xe9.png"  # Latin-1 "café.png": no UTF-8 decoding; Python keeps the byte as a surrogate


@functools.cache
def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (SIDE, SIDE)).save(buffer, "PNG", optimize=True)  # 18 MB to make, once
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares width x height one-bit pixels and holds almost no data (never decodable)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def png_file(path: Path | bytes, side: int = 16, value: int = 128) -> None:
    with open(path, "wb") as f:
        Image.new("RGB", (side, side), (value, 255 - value, 64)).save(f, "PNG")


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


# -- defect 4: pixel bombs
def test_open_image_refuses_a_pixel_bomb_from_its_header_with_the_size_in_the_message():
    with pytest.raises(ImageTooLarge) as info:
        open_image(bomb())
    assert info.value.size == (SIDE, SIDE) and info.value.limit == DEFAULT_MAX_PIXELS
    assert "12000x12000 px" in str(info.value) and str(DEFAULT_MAX_PIXELS) in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).size == (SIDE, SIDE)  # raised in a loader worker
    # a bomb past PIL's own error threshold (2 x 89.5 MP) is the same refusal, whatever our limit
    with pytest.raises(ImageTooLarge, match=r"900000000 px"):
        open_image(header_only_png(30000, 30000), max_pixels=None)
    # the limit is on pixels: 28 x 28 = 784 passes at 784 and is refused at 783
    small = test_serve.png_bytes(fashion_mnist_test_images(1)[0][0])
    assert open_image(small, max_pixels=784).size == (28, 28)
    with pytest.raises(ImageTooLarge, match="28x28 px"):
        open_image(small, max_pixels=783)


MEMORY_PROBE = r"""
import json, sys
from pathlib import Path
from visiontune.data.files import check_image, load_image
from visiontune.data.images import open_image
from visiontune.predict import FileInputs
from visiontune.serve import BadRequest, decode

path = Path(sys.argv[1])
data = path.read_bytes()


def status(field):  # MB, from the kernel's own account of this process (Linux)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current size
    except OSError:  # an older kernel: the peak so far stays, and a refused decode can only look smaller
        return status("VmHWM")
    return status("VmRSS")


peak = lambda: status("VmHWM")
outcomes = {}

def attempt(name, call):
    try:
        call()
        outcomes[name] = "decoded"
    except BadRequest as exc:
        outcomes[name] = f"{exc.status} {exc.message}"
    except Exception as exc:
        outcomes[name] = f"{type(exc).__name__}: {exc}"

before = rss()
attempt("open_image", lambda: open_image(data))
attempt("serve", lambda: decode(data))
attempt("load_image", lambda: load_image(path))
outcomes["check_image"] = check_image(path)
outcomes["predict"] = FileInputs([path], lambda image: image)[0][2]
refused = peak() - before
before = rss()
open_image(data, max_pixels=None)  # the control: decoding it does show
decoded = peak() - before
print(json.dumps({"refused_mb": refused, "decoded_mb": decoded, "outcomes": outcomes}))
"""


def test_a_pixel_bomb_is_refused_everywhere_without_the_memory_of_decoding_it(tmp_path):
    """In a fresh process, so the peak memory is this process's own: every decoder (service, predict,
    training loaders) refuses the bomb while the process grows by less than 200 MB; decoding it (the
    control) grows it by more than 300 MB."""
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb())
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    outcomes = found["outcomes"]
    assert outcomes["open_image"].startswith("ImageTooLarge") and "12000x12000" in outcomes["open_image"]
    assert outcomes["serve"].startswith("413 image too large") and "max_pixels" in outcomes["serve"]
    assert outcomes["load_image"].startswith("ImageTooLarge")
    assert outcomes["check_image"].startswith("too large: 12000x12000 px")
    assert outcomes["predict"].startswith("too large") and "max_pixels" in outcomes["predict"]
    assert found["refused_mb"] < 200, found
    assert found["decoded_mb"] > 300, found  # the measure sees a decode


def test_the_service_answers_413_for_a_pixel_bomb_and_keeps_serving(server):
    with httpx.Client(base_url=server.url, timeout=test_serve.TIMEOUT) as client:
        response = client.post("/predict", content=bomb())
        assert response.status_code == 413
        message = response.json()["error"]
        assert "12000x12000 px" in message and "max_pixels" in message and "\n" not in message
        form = client.post("/predict", files={"file": ("bomb.png", bomb(), "image/png")})
        assert form.status_code == 413
        assert client.get("/health").json()["status"] == "ok"
        good = client.post("/predict", content=test_serve.png_bytes(fashion_mnist_test_images(1)[0][0]))
        assert good.status_code == 200 and good.json()["label"]


def test_the_service_limit_is_its_max_pixels_key(tiny_checkpoint, tmp_path, capsys):
    small = test_serve.png_bytes(fashion_mnist_test_images(1)[0][0])
    assert decode(small, max_pixels=784).size == (28, 28)
    with pytest.raises(BadRequest) as info:
        decode(small, max_pixels=783)
    assert info.value.status == 413 and "28x28 px" in info.value.message
    from visiontune.serve import main

    code = run_main(main, f"ckpt_path={tiny_checkpoint}", "max_pixels=0", f"hydra.run.dir={tmp_path}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: max_pixels=0 must be")


def test_training_data_lists_a_pixel_bomb_as_a_bad_file_under_its_limit(tmp_path):
    paths = write_images(tmp_path / "a", 2)
    (tmp_path / "a" / "bomb.png").write_bytes(bomb())
    listed = [str(p) for p in paths] + [str(tmp_path / "a" / "bomb.png")]
    with pytest.warns(UserWarning, match=r"bomb.png \(too large: 12000x12000 px"):
        good, _ = drop_bad_files(listed, [0, 0, 0], tmp_path, strict=False)
    assert good == [str(p) for p in paths]
    with pytest.raises(UserError, match="1 bad files"):
        drop_bad_files(listed, [0, 0, 0], tmp_path, strict=True)
    with pytest.warns(UserWarning, match="skipping 2 bad files"):  # 28 x 28 over a limit of 783
        assert drop_bad_files(listed[:2], [0, 0], tmp_path, strict=False, max_pixels=783) == ([], [])
    with pytest.raises(UserError, match="data.max_pixels"):
        validate_config(compose_cfg([*FAST, "data.max_pixels=0"], tmp_path / "run"))


# -- defect 6 (names that are not UTF-8) and 12 (a symlink loop, a folder in a list) in predict
def test_predict_gives_every_odd_file_its_row_and_writes_the_csv_whole(tiny_checkpoint, tmp_path):
    pics = tmp_path / "pics"
    good = write_images(pics, 2)
    (pics / "bomb.png").write_bytes(bomb())
    os.symlink("loop", pics / "loop")  # a link to itself
    png_file(os.fsencode(pics) + b"/" + NOT_UTF8)
    odd = pics / os.fsdecode(NOT_UTF8)
    out = tmp_path / "p"
    summary = predict(compose_cfg([f"ckpt_path={tiny_checkpoint}", f"inputs={pics}"], out, "predict"))
    rows = read_rows(out / "predictions.csv")
    assert set(rows) == {str(p) for p in [*good, odd, pics / "bomb.png", pics / "loop"]}
    assert rows[str(odd)]["error"] == "" and rows[str(odd)]["label"]  # predicted, its name byte for byte
    bomb_row = rows[str(pics / "bomb.png")]
    assert bomb_row["error"].startswith("too large: 12000x12000 px") and "max_pixels" in bomb_row["error"]
    assert bomb_row["label"] == ""
    assert "symlink loop" in rows[str(pics / "loop")]["error"]
    assert summary["images"] == 3 and summary["errors"] == 2
    assert not list(out.glob("*.tmp"))

    listing = tmp_path / "list.txt"
    listing.write_text(f"pics/{good[0].name}\npics\ngone.png\n")
    summary = predict(
        compose_cfg([f"ckpt_path={tiny_checkpoint}", f"inputs={listing}"], tmp_path / "l", "predict")
    )
    rows = read_rows(tmp_path / "l" / "predictions.csv")
    assert rows[str(tmp_path / "pics")]["error"] == "is a folder, not an image file"
    assert rows[str(tmp_path / "gone.png")]["error"] == "missing"
    assert rows[str(good[0])]["error"] == "" and summary["errors"] == 2


def test_a_csv_that_fails_to_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "predictions.csv"
    with pytest.raises(ValueError, match="not in fieldnames"):
        write_rows([{"path": "a.png", "error": "", "surprise": 1}], ["path", "error"], target)
    assert list(tmp_path.iterdir()) == []


def test_the_files_fingerprint_hashes_a_name_that_is_not_utf8(tmp_path):
    png_file(os.fsencode(tmp_path) + b"/" + NOT_UTF8)
    odd = str(tmp_path / os.fsdecode(NOT_UTF8))
    plain = tmp_path / "plain.png"
    png_file(plain)
    assert files_fingerprint([odd]) != files_fingerprint([str(plain)])
    assert files_fingerprint([odd, str(tmp_path / "gone.png")]) != files_fingerprint([odd])
    # UTF-8 names hash as before, so the caches already on disk keep their keys
    stat = plain.stat()
    before = hashlib.sha256(f"{plain}:{stat.st_size}:{stat.st_mtime_ns}\n".encode()).hexdigest()
    assert files_fingerprint([str(plain)]) == before


def test_a_run_with_a_disk_cache_trains_on_a_name_that_is_not_utf8_and_skips_a_bomb(tmp_path):
    from visiontune.train import train

    root = tmp_path / "ds"
    for split, n in (("train", 4), ("test", 2)):
        for label, value in (("a", 30), ("b", 220)):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                png_file(root / split / label / f"{i}.png", value=value + i)
    png_file(os.fsencode(root / "train" / "a") + b"/" + NOT_UTF8, value=40)
    (root / "train" / "b" / "bomb.png").write_bytes(bomb())
    cfg = compose_cfg([*FAST, "data=imagefolder", f"data.root={root}", "data.cache=disk", "augment=none",
                       "data.train_subset=null", "data.val_subset=null", "data.test_subset=null",
                       "data.val_fraction=0.34"], tmp_path / "run")  # fmt: skip
    with pytest.warns(UserWarning, match=r"bomb.png \(too large"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/acc"] >= 0
    assert len(list((root / ".cache").glob("images-*.npy"))) == 6  # 3 splits, images + mask


# -- defect 7: damaged caches are noticed by their checksum and rebuilt
def damage(path: Path) -> None:
    """Invert 64 bytes in the middle of the file: the same size, other values."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def test_a_damaged_image_cache_is_rebuilt_with_a_warning_naming_the_file(tmp_path, caplog):
    root, cache = folder(tmp_path / "d"), tmp_path / "cache"
    datamodule(root, cache="disk", cache_dir=str(cache))
    arrays = [p for p in cache.glob("images-*.npy") if not p.name.endswith("-ok.npy")]
    sizes = {p: p.stat().st_size for p in arrays}
    for path in arrays:
        damage(path)
    assert {p: p.stat().st_size for p in arrays} == sizes
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        again = datamodule(root, cache="disk", cache_dir=str(cache))
    for path in arrays:
        assert f"{path} is corrupt or stale (its bytes do not match the checksum" in caplog.text
    fresh = datamodule(root, cache="disk", cache_dir=str(tmp_path / "fresh"))
    for split in ("train_set", "val_set", "test_set"):
        a, b = getattr(again, split), getattr(fresh, split)
        assert len(a) == len(b) and all(torch.equal(a[i][0], b[i][0]) for i in range(len(a))), split


def test_a_damaged_feature_cache_is_rebuilt_with_a_warning_naming_the_file(tmp_path, caplog):
    from visiontune.train import train

    cache = tmp_path / "features"
    train(probe(tmp_path, "first", f"finetune.cache_dir={cache}"))
    stored = {p: np.load(p) for p in cache.glob("*.npy")}
    assert len(stored) == 3  # train, val, test
    largest = max(stored, key=lambda p: p.stat().st_size)
    damage(largest)
    assert not np.allclose(np.load(largest).astype(np.float32), stored[largest].astype(np.float32), atol=1e-2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        train(probe(tmp_path, "second", f"finetune.cache_dir={cache}"))
    assert f"feature cache {largest} is corrupt or stale (its bytes do not match the checksum" in caplog.text
    assert "computed" in caplog.text
    rebuilt = np.load(largest).astype(np.float32)
    np.testing.assert_allclose(rebuilt, stored[largest].astype(np.float32), atol=1e-2, rtol=0)
