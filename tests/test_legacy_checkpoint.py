"""A checkpoint written before multiclass became a one-head task (tests/data/legacy_multiclass.ckpt:
timm:test_efficientnet, 10 Fashion-MNIST classes, temperature 1.5, `task: None`, head keys `head.1.*`)
still loads in eval, predict, export and serve, through each command's own entry, and its stored
temperature is applied everywhere."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import compose_cfg, write_images
from hydra.core.global_hydra import GlobalHydra

from visiontune import eval as eval_command
from visiontune import export as export_command
from visiontune import predict as predict_command
from visiontune.data.images import open_image
from visiontune.deploy.session import InferenceSession
from visiontune.serve import create_app, make_predictor
from visiontune.training.checkpoints import load_checkpoint, load_classifier

LEGACY = Path(__file__).parent / "data" / "legacy_multiclass.ckpt"
T = 1.5


def run_main(main, monkeypatch, *overrides: str) -> None:
    """A command's console-script entry, in this process, with these command-line overrides."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["visiontune", *overrides])
    main()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("legacy_images"), 6)


@pytest.fixture(scope="module")
def reference(images):
    """softmax(logits / 1.5) of the model itself, by file name, through its eval transform."""
    model = load_classifier(LEGACY)
    transform = InferenceSession.from_checkpoint(LEGACY, "cpu").transform
    with torch.no_grad():
        logits = model(torch.stack([transform(open_image(p)) for p in images]))
    return {p.name: (logits / T).softmax(-1) for p, logits in zip(images, logits, strict=True)}


def test_the_file_is_in_the_old_format():
    checkpoint = load_checkpoint(LEGACY)
    assert checkpoint["hyper_parameters"]["task"] is None
    assert checkpoint["hyper_parameters"]["temperature"] == T
    assert "head.1.weight" in checkpoint["state_dict"]  # dropout 0.2, then the linear layer
    model = load_classifier(LEGACY)
    assert [(h.name, h.kind, len(h.classes)) for h in model.heads] == [("class", "multiclass", 10)]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # predict_step applies the stored temperature, as predict_proba does
        assert torch.allclose(model.predict_step(x, 0), (model(x) / T).softmax(-1), atol=1e-6)


def test_eval_loads_it_and_reports_at_its_temperature(monkeypatch, tmp_path):
    run_main(eval_command.main, monkeypatch, f"ckpt_path={LEGACY}", "device=cpu", "report.enabled=false",
             f"hydra.run.dir={tmp_path}")  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["temperature"] == T and metrics["test/images"] == 64
    assert 0 <= metrics["test/acc"] <= 1 and metrics["test/nll"] != pytest.approx(metrics["test/loss"])


def test_eval_still_takes_the_old_device_key_with_a_warning(tmp_path):
    cfg = compose_cfg(
        [f"ckpt_path={LEGACY}", "trainer.accelerator=cpu", "report.enabled=false"], tmp_path, "eval"
    )
    with pytest.warns(DeprecationWarning, match=r"trainer.accelerator=cpu .* use device=cpu"):
        metrics = eval_command.evaluate(cfg, patch={})
    assert metrics["temperature"] == T


def test_predict_loads_it_and_applies_the_temperature(monkeypatch, tmp_path, images, reference):
    run_main(predict_command.main, monkeypatch, f"ckpt_path={LEGACY}", f"inputs={images[0].parent}", "topk=10",
             f"hydra.run.dir={tmp_path}")  # fmt: skip
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(images)
    names = load_classifier(LEGACY).hparams.class_names
    for row in rows:
        expected = reference[Path(row["path"]).name]
        got = {row[f"top{r}_label"]: float(row[f"top{r}_prob"]) for r in range(1, 11)}
        assert max(abs(got[n] - float(p)) for n, p in zip(names, expected, strict=True)) <= 1e-5


def test_export_loads_it_and_folds_the_temperature_in(monkeypatch, tmp_path, images, reference):
    run_main(export_command.main, monkeypatch, f"ckpt_path={LEGACY}", "format=onnx", "parity_images=8",
             f"hydra.run.dir={tmp_path}")  # fmt: skip
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert spec["temperature"] == T and spec["task"]["heads"][0]["kind"] == "multiclass"
    assert json.loads((tmp_path / "export.json").read_text())["max_abs_diff"] <= 1e-4
    session = InferenceSession.from_export(tmp_path / "model.onnx")
    probs = session([open_image(p) for p in images])
    expected = np.stack([reference[p.name].numpy() for p in images])
    assert np.abs(probs - expected).max() <= 1e-4
    # an export written before preprocess.json described the task (no `task`): one multiclass head
    del spec["task"]
    (tmp_path / "preprocess.json").write_text(json.dumps(spec))
    old = InferenceSession.from_export(tmp_path / "model.onnx")
    assert [(h.kind, h.classes) for h in old.heads] == [("multiclass", tuple(spec["class_names"]))]
    assert np.abs(old([open_image(p) for p in images]) - expected).max() <= 1e-4


def test_serve_loads_it_and_answers_at_its_temperature(tmp_path, images, reference):
    cfg = compose_cfg([f"ckpt_path={LEGACY}", "device=cpu"], tmp_path, "serve")
    names = load_classifier(LEGACY).hparams.class_names
    with warnings.catch_warnings(), TestClient(create_app(make_predictor(cfg), topk=10)) as client:
        assert client.get("/health").json()["temperature"] == T
        for path in images[:3]:
            answer = client.post("/predict", content=path.read_bytes()).json()
            served = {t["label"]: t["prob"] for t in answer["topk"]}
            expected = reference[path.name]
            assert max(abs(served[n] - float(p)) for n, p in zip(names, expected, strict=True)) <= 1e-5
