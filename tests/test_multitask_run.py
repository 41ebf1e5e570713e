"""Tiny multitask and multilabel runs end to end: train, resume exactly, eval, predict, export, serve.

The data is scripts/make_fashion_tasks.py's, at a tiny size: Fashion-MNIST images with their class
and coarse group (one group cell in four blanked: a missing label), and 2x2 mosaics with their set of classes.
"""

from __future__ import annotations

import csv
import json

import httpx
import pytest
import torch
from helpers import SMALL, compose_cfg, make_fashion_tasks

from visiontune.deploy import outputs
from visiontune.deploy.session import InferenceSession
from visiontune.errors import UserError
from visiontune.eval import evaluate
from visiontune.export import export
from visiontune.predict import predict
from visiontune.serve import ServerThread, bind_socket, create_app
from visiontune.train import train

RUN = ["data=csv", "data.image_size=32", "data.batch_size=16", "data.num_workers=0", f"model.backbone={SMALL}",
       "model.pretrained=false", "trainer.num_sanity_val_steps=0", "callbacks.progress.refresh_rate=0",
       "logger=csv", "scheduler=none"]  # fmt: skip
HEADS = ("task.heads=[{name: class, column: class, kind: multiclass, weight: 1.0}, "
         "{name: group, column: group, kind: multiclass, weight: 0.5}]")  # fmt: skip


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    out = make_fashion_tasks(tmp_path_factory.mktemp("fashion_tasks"), train=48, val=16, test=16)
    train_csv = out / "multitask" / "train.csv"
    header, *rows = train_csv.read_text().splitlines()
    rows = [row.rsplit(",", 1)[0] + "," if i % 4 == 0 else row for i, row in enumerate(rows)]
    train_csv.write_text("\n".join([header, *rows]) + "\n")
    return out


def multitask_cfg(task_data, run_dir, *extra):
    overrides = [*RUN, "task=multitask", HEADS, "task.loss_weighting=uncertainty", "model.head.dropout=0.3",
                 f"data.root={task_data / 'multitask'}", *extra]  # fmt: skip
    return compose_cfg(overrides, run_dir)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_tiny_multitask_run_trains_resumes_exactly_evaluates_and_predicts(task_data, tmp_path, monkeypatch):
    straight, first, resumed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(multitask_cfg(task_data, straight, "trainer.max_epochs=2"))
    train(multitask_cfg(task_data, first, "trainer.max_epochs=1"))
    train(
        multitask_cfg(
            task_data, resumed, "trainer.max_epochs=2", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"
        )
    )
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    c = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(a["state_dict"]) == set(c["state_dict"]) and "head.log_vars" in a["state_dict"]
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), c["state_dict"][key].float(), atol=1e-6), key
    assert torch.any(a["state_dict"]["head.log_vars"] != 0)  # the uncertainty weights learned

    metrics = json.loads((straight / "metrics.json").read_text())
    resumed_metrics = json.loads((resumed / "metrics.json").read_text())
    for key in (
        "test/class/acc",
        "test/group/acc",
        "test/score",
        "val/class/acc",
        "val/group/acc",
        "val/score",
    ):
        assert key in metrics, key
    assert metrics["test/score"] == pytest.approx((metrics["test/class/acc"] + metrics["test/group/acc"]) / 2)
    assert resumed_metrics["test/class/acc"] == pytest.approx(metrics["test/class/acc"])
    assert a["hyper_parameters"]["monitor"]["monitor"] == "val/score"

    best = straight / "checkpoints" / "best.ckpt"
    evaluated = evaluate(compose_cfg([f"ckpt_path={best}"], tmp_path / "eval", config_name="eval"), patch={})
    for key in ("test/class/acc", "test/group/acc", "test/score", "test/loss"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-5), key
    rows = read_rows(tmp_path / "eval" / "per_label.csv")
    assert {r["head"] for r in rows} == {"class", "group"} and len(rows) == 10 + 4
    with monkeypatch.context() as m:  # calibrate=true is multiclass-only: refused before the test pass
        m.setattr(InferenceSession, "collect", lambda *a, **k: pytest.fail("the test pass ran first"))
        with pytest.raises(UserError, match="calibrate=true is for multiclass checkpoints"):
            evaluate(compose_cfg([f"ckpt_path={best}", "calibrate=true"], tmp_path / "eval2", config_name="eval"),
                     patch={})  # fmt: skip

    summary = predict(compose_cfg([f"ckpt_path={best}", "inputs=split:test"], tmp_path / "pred", config_name="predict"),
                      patch={})  # fmt: skip
    predictions = read_rows(tmp_path / "pred" / "predictions.csv")
    top = lambda head, k: [f"{head}/top{r}_{c}" for r in range(1, k + 1) for c in ("label", "prob")]  # noqa: E731
    assert list(predictions[0]) == ["path", "class/label", "class/prob", *top("class", 5), "class/target",
                                    "class/correct", "group/label", "group/prob", *top("group", 4), "group/target",
                                    "group/correct", "error"]  # fmt: skip
    assert summary["test/class/acc"] == pytest.approx(metrics["test/class/acc"])
    assert summary["test/group/acc"] == pytest.approx(metrics["test/group/acc"])
    groups = {
        "Bag": "bags",
        "Trouser": "bottoms",
        "Sandal": "footwear",
        "Sneaker": "footwear",
        "Ankle boot": "footwear",
    }
    assert all(groups.get(r["class/target"], "tops") == r["group/target"] for r in predictions)


def test_a_tiny_multilabel_run_tunes_thresholds_that_predict_export_and_serve_use(task_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*RUN, "task=multilabel", "task.threshold=auto", "task.pos_weight=true", "finetune=linear_probe",
                       "trainer.max_epochs=1", f"data.root={task_data / 'mosaic'}"], run_dir)  # fmt: skip
    train(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/map", "test/map", "test/map_micro", "test/f1"):
        assert 0 <= metrics[key] <= 1, key
    assert any(k.startswith("test/ap/") for k in metrics)
    best = run_dir / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["hyper_parameters"]["monitor"]["monitor"] == "val/map"
    thresholds = checkpoint["state_dict"]["head.thresholds"]
    assert thresholds.shape == (10,) and torch.any(thresholds != 0.5)  # tuned on the validation split
    assert checkpoint["hyper_parameters"]["task"]["heads"][0]["pos_weight"] is not None

    predict(compose_cfg([f"ckpt_path={best}", f"inputs={task_data / 'mosaic' / 'images' / 'test'}"],
                        tmp_path / "pred", config_name="predict"), patch={})  # fmt: skip
    rows = read_rows(tmp_path / "pred" / "predictions.csv")
    assert list(rows[0]) == ["path", "labels", "probs", "error"] and len(rows) == 16

    predictor = InferenceSession.from_checkpoint(best, "cpu")
    assert predictor.task["heads"][0]["thresholds"] == pytest.approx(thresholds.tolist())
    image_path = rows[0]["path"]
    with ServerThread(create_app(predictor), bind_socket("127.0.0.1", 0)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answer = client.post("/predict", content=open(image_path, "rb").read()).json()
            assert client.get("/health").json()["task"] == "multilabel"
    classes = predictor.task["heads"][0]["classes"]
    probs = [answer["probs"][c] for c in classes]
    expected = [c for c, p, t in zip(classes, probs, thresholds.tolist(), strict=True) if p >= t]
    assert sorted(x["label"] for x in answer["labels"]) == sorted(expected)
    assert "|".join(x["label"] for x in answer["labels"]) == rows[0]["labels"]  # predict agrees

    result = export(
        compose_cfg([f"ckpt_path={best}", "format=onnx"], tmp_path / "export", config_name="export"), patch={}
    )
    assert result["max_abs_diff"] <= 1e-4
    spec = json.loads((tmp_path / "export" / "preprocess.json").read_text())
    assert spec["task"]["heads"][0]["thresholds"] == pytest.approx(thresholds.tolist())
    assert outputs.decide(probs, spec["task"])["labels"] == [
        (x["label"], pytest.approx(x["prob"])) for x in answer["labels"]
    ]
