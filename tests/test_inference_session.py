"""One inference path: the same 32 images through eval's logits, predict's CSV, the HTTP service on the
checkpoint and the service on its ONNX export give the same probabilities, on a calibrated checkpoint
(T = 1.7), within 1e-5 on the torch paths and 1e-4 with ONNX; and every command shares one device key
and one meaning of data.allow_class_mismatch."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import compose_cfg, write_images

from visiontune import eval as eval_command
from visiontune.deploy.session import InferenceSession, device_setting, pick_device
from visiontune.errors import UserError
from visiontune.export import export
from visiontune.predict import predict
from visiontune.serve import create_app

T = 1.7
FOLDERS = [f"c{i}" for i in range(10)]  # ten classes, not the checkpoint's names


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with temperature 1.7 stored, as eval calibrate=true would write it."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["temperature"] = T
    path = tmp_path_factory.mktemp("calibrated") / "calibrated.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """32 Fashion-MNIST test images as an image folder's test split (its train and val splits hold one
    image per class folder, so the data has the checkpoint's ten classes, by count)."""
    root = tmp_path_factory.mktemp("same32")
    for i in range(32):
        write_images(root / "test" / FOLDERS[i % 10], 1, start=200 + i)
    for name in FOLDERS:
        write_images(root / "train" / name, 1)
        write_images(root / "val" / name, 1)
    return root


def patch_for(root: Path, allow: bool = True) -> dict:
    return {"name": "imagefolder", "root": str(root), "allow_class_mismatch": allow,
            "train_subset": None, "val_subset": None, "test_subset": None}  # fmt: skip


def eval_logits(ckpt, root: Path, tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """The logits eval computes for its report, by file name."""
    seen = {}

    def capture(session, logits, targets, indices, cfg, run_dir):
        paths = session.datamodule.test_set.paths
        seen.update({Path(paths[int(i)]).name: z for i, z in zip(indices, logits, strict=True)})
        return {}

    monkeypatch.setitem(eval_command.REPORTS, "multiclass", capture)
    eval_command.evaluate(compose_cfg([f"ckpt_path={ckpt}", "device=cpu"], tmp_path / "eval", "eval"),
                          patch=patch_for(root))  # fmt: skip
    return seen


def csv_probs(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for row in rows:
        got = {row[f"top{r}_label"]: float(row[f"top{r}_prob"]) for r in range(1, len(names) + 1)}
        out[Path(row["path"]).name] = np.array([got[n] for n in names])
    return out


def served_probs(session: InferenceSession, files: list[Path], names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    with TestClient(create_app(session, topk=len(names))) as client:
        assert client.get("/health").json()["temperature"] == pytest.approx(T)
        for path in files:
            answer = client.post("/predict", content=path.read_bytes())
            assert answer.status_code == 200, answer.text
            got = {t["label"]: t["prob"] for t in answer.json()["topk"]}
            out[path.name] = np.array([got[n] for n in names])
    return out


def test_eval_predict_serve_and_onnx_give_the_same_probabilities(calibrated, folder, tmp_path, monkeypatch):
    files = sorted((folder / "test").rglob("*.png"))
    assert len(files) == 32
    logits = eval_logits(calibrated, folder, tmp_path, monkeypatch)
    assert sorted(logits) == sorted(p.name for p in files)
    reference = {name: (z / T).softmax(-1).numpy() for name, z in logits.items()}  # softmax(logits / T)
    uncalibrated = {name: z.softmax(-1).numpy() for name, z in logits.items()}
    assert max(np.abs(reference[n] - uncalibrated[n]).max() for n in reference) > 1e-3  # T matters here

    session = InferenceSession.from_checkpoint(calibrated, "cpu")
    names = session.class_names
    predict(compose_cfg([f"ckpt_path={calibrated}", f"inputs={folder / 'test'}", "topk=10", "device=cpu"],
                        tmp_path / "predict", "predict"), patch={})  # fmt: skip
    predicted = csv_probs(tmp_path / "predict" / "predictions.csv", names)
    served = served_probs(session, files, names)
    export(compose_cfg([f"ckpt_path={calibrated}", "format=onnx"], tmp_path / "export", "export"), patch={})
    onnx = served_probs(InferenceSession.from_export(tmp_path / "export" / "model.onnx"), files, names)

    def worst(probs: dict) -> float:
        return max(float(np.abs(probs[n] - reference[n]).max()) for n in reference)

    assert worst(predicted) <= 1e-5  # predictions.csv holds 6 decimals
    assert worst(served) <= 1e-5
    assert worst(onnx) <= 1e-4


def test_every_command_checks_class_names_the_same_way(tiny_checkpoint, folder):
    """data.allow_class_mismatch: the data's names differ from the checkpoint's (same count): refused
    unless the command line allows it, for every command (they all open their data through the session)."""
    refused = InferenceSession.from_checkpoint(tiny_checkpoint, "cpu", patch_for(folder, allow=False))
    with pytest.raises(UserError, match=r"class names differ.*only in the data: \['c0'"):
        refused.labelled_data()
    allowed = InferenceSession.from_checkpoint(tiny_checkpoint, "cpu", patch_for(folder, allow=True))
    assert list(allowed.labelled_data().classes) == FOLDERS
    unset = dict(patch_for(folder))
    del unset["allow_class_mismatch"]  # not on the command line: refused, whatever the checkpoint stored
    with pytest.raises(UserError, match="class names differ"):
        InferenceSession.from_checkpoint(tiny_checkpoint, "cpu", unset).labelled_data()


@pytest.mark.parametrize("command", ["eval", "predict", "serve", "compress"])
def test_one_device_key_in_every_command(command, tmp_path):
    cfg = compose_cfg(["device=cpu"], tmp_path, command)
    assert device_setting(cfg) == "cpu"
    with pytest.raises(UserError, match="device=tpu is unknown"):
        pick_device("tpu")
