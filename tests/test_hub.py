"""The Hugging Face Hub: the export folder (format=hf) opens in predict, eval and serve with the checkpoint's
probabilities; `timm:hf_hub:<repo>` backbones build from the Hub cache, offline too; a bad repo id, an
offline push and an incomplete folder are one line and exit code 2."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import SMALL, compose_cfg, fashion_mnist_test_images, run_main, write_images
from PIL import Image

from visiontune import eval as eval_command
from visiontune.deploy.session import InferenceSession
from visiontune.errors import UserError
from visiontune.export import export
from visiontune.export import main as export_main
from visiontune.models.backbones import backbone_data_config, create_backbone, weights_status
from visiontune.predict import main as predict_main
from visiontune.predict import predict
from visiontune.serve import create_app, make_predictor
from visiontune.training.checkpoints import AtomicCheckpointIO, load_classifier, write_hub_files
from visiontune.training.module import ImageClassifier

T = 2.0
OFFLINE = "http://127.0.0.1:9"  # nothing listens there: a connection fails at once


@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """A run dir as training leaves it (checkpoints/best.ckpt, metrics.json), the checkpoint calibrated to T = 2,
    and a confusion matrix beside its metrics, as an eval run writes one."""
    run = tmp_path_factory.mktemp("run")
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["temperature"] = T
    (run / "checkpoints").mkdir()
    torch.save(checkpoint, run / "checkpoints" / "best.ckpt")
    shutil.copyfile(tiny_checkpoint.parent.parent / "metrics.json", run / "metrics.json")
    Image.new("RGB", (8, 8), "white").save(run / "confusion_matrix.png")
    return run


@pytest.fixture(scope="module")
def folder(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_export")
    export(compose_cfg([f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "format=hf", "parity_images=8",
                        "repo_id=someone/tiny-fmnist"], out, "export"), patch={})  # fmt: skip
    return out / "hf"


def test_the_folder_holds_the_weights_the_config_and_a_card_with_the_metrics(folder, run_dir):
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md",
                                                  "confusion_matrix.png", "metrics.json"}  # fmt: skip
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    config = json.loads((folder / "config.json").read_text())
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert config["hyper_parameters"] == json.loads(json.dumps(checkpoint["hyper_parameters"]))
    assert config["architecture"] == SMALL and config["temperature"] == T
    assert config["id2label"]["1"] == "Trouser" and config["task"]["heads"][0]["stop"] == 10
    assert config["preprocessing"]["input_size"] == [3, 32, 32]
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: visiontune" in front and "pipeline_tag: image-classification" in front
    assert "license: other" in front and "# tiny-fmnist" in card
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"| test/acc | {metrics['test/acc']:.4f} |" in card and "| metric | value |" in card
    assert json.loads((folder / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]  # the page's
    assert "![confusion matrix](confusion_matrix.png)" in card and "backbone: timm:test_efficientnet" in card
    assert "## Intended use and limits" in card and "hf download someone/tiny-fmnist" in card
    report = json.loads((folder.parent / "export.json").read_text())
    assert report["format"] == "hf" and report["max_abs_diff"] <= 1e-6 and report["parity_images"] == 8


def test_predict_eval_and_serve_on_the_folder_give_the_checkpoints_probabilities(folder, run_dir, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    images = [Image.fromarray(a).convert("RGB") for a, _ in fashion_mnist_test_images(6, start=300)]
    reference = InferenceSession.from_checkpoint(ckpt, "cpu")
    expected = reference(images)
    assert np.abs(expected - (reference.logits(torch.stack([reference.transform(i) for i in images])) / T)
                  .softmax(-1).numpy()).max() < 1e-6  # T = 2 is applied  # fmt: skip
    assert np.abs(InferenceSession.from_checkpoint(folder, "cpu")(images) - expected).max() <= 1e-6

    files = write_images(tmp_path / "pics", 4, start=300)
    predict(compose_cfg([f"ckpt_path={folder}", f"inputs={tmp_path / 'pics'}", "topk=10", "device=cpu"],
                        tmp_path / "predict", "predict"), patch={})  # fmt: skip
    with open(tmp_path / "predict" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = reference.class_names
    for row, probs in zip(rows, expected[:4], strict=True):
        got = {row[f"top{r}_label"]: float(row[f"top{r}_prob"]) for r in range(1, 11)}
        assert np.abs(np.array([got[n] for n in names]) - probs).max() <= 1e-6  # 6 decimals in the CSV

    seen = {}
    monkeypatch.setitem(eval_command.REPORTS, "multiclass", lambda session, logits, *rest: seen.update(
        {session.source: session.probabilities(logits).numpy()}) or {})  # fmt: skip
    for source in (ckpt, folder):
        eval_command.evaluate(
            compose_cfg([f"ckpt_path={source}", "device=cpu"], tmp_path / "eval", "eval"), patch={}
        )
    assert np.abs(seen[str(folder)] - seen[str(ckpt)]).max() <= 1e-6 and len(seen[str(folder)]) == 32

    served = make_predictor(compose_cfg([f"ckpt_path={folder}", "device=cpu"], tmp_path / "serve", "serve"))
    with TestClient(create_app(served, topk=10)) as client:
        answer = client.post("/predict", content=files[0].read_bytes())
    assert answer.status_code == 200, answer.text
    got = {t["label"]: t["prob"] for t in answer.json()["topk"]}
    assert np.abs(np.array([got[n] for n in names]) - expected[0]).max() <= 1e-6


def test_a_multitask_model_comes_back_with_its_heads_thresholds_and_weights(tmp_path):
    task = {"name": "multitask", "loss_weighting": "uncertainty", "threshold": 0.5, "heads": [
        {"name": "a", "kind": "multiclass", "classes": ["0", "1", "2"], "weight": 1.0},
        {"name": "b", "kind": "multilabel", "classes": ["x", "y"], "weight": 1.0},
    ]}  # fmt: skip
    torch.manual_seed(0)
    model = ImageClassifier(model={"backbone": SMALL, "pretrained": False}, num_classes=5,
                            optim={"optimizer": {"name": "sgd", "lr": 0.1}}, task=task).eval()  # fmt: skip
    model.head.thresholds.copy_(torch.tensor([0.5, 0.5, 0.5, 0.3, 0.8]))
    with torch.no_grad():
        model.head.log_vars.copy_(torch.tensor([0.4, -0.2]))
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": json.loads(json.dumps(dict(model.hparams))),
    }
    write_hub_files(checkpoint, tmp_path, {})
    loaded = load_classifier(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [h.name for h in loaded.heads] == ["a", "b"]
    assert loaded.head.thresholds.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.3, 0.8])
    assert loaded.head.log_vars.tolist() == pytest.approx([0.4, -0.2])


# -- timm:hf_hub:<repo>
def fake_hub_cache(root: Path, repo: str, model: torch.nn.Module, mean: list[float]) -> Path:
    """The Hub cache layout huggingface_hub reads (models--org--name/refs/main, snapshots/<commit>/...), holding
    a timm repo: config.json (its architecture and pretrained config) and model.safetensors."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    pretrained_cfg = {**model.pretrained_cfg, "mean": mean, "std": [0.25] * 3, "input_size": [3, 48, 48]}
    config = {"architecture": model.default_cfg["architecture"], "num_classes": model.num_classes,
              "num_features": model.num_features, "pretrained_cfg": pretrained_cfg}  # fmt: skip
    (snapshot / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache in tmp_path, and a Hub that cannot be reached."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when huggingface_hub was imported
    monkeypatch.setattr(constants, "ENDPOINT", OFFLINE)
    return cache


def test_an_hf_hub_backbone_builds_from_the_cache_with_its_weights_and_preprocessing(hub_cache):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", num_classes=7)
    snapshot = fake_hub_cache(hub_cache, "acme/tiny-effnet", source, mean=[0.1, 0.2, 0.3])
    for name in ("timm:hf_hub:acme/tiny-effnet", "timm:hf-hub:acme/tiny-effnet"):
        backbone = create_backbone(name, pretrained=True)
        state = backbone.body.state_dict()
        assert state and all(torch.equal(v, source.state_dict()[k]) for k, v in state.items())
        assert backbone.name == name and backbone.num_features == source.num_features and backbone.steps()
    config = backbone_data_config("timm:hf_hub:acme/tiny-effnet")  # without building it
    assert config["mean"] == (0.1, 0.2, 0.3) and config["input_size"] == (3, 48, 48)
    assert backbone.data_config == config
    assert weights_status("timm:hf_hub:acme/tiny-effnet") == f"yes ({snapshot / 'model.safetensors'})"


def test_an_hf_hub_backbone_not_in_the_cache_offline_is_one_line_naming_the_cache(hub_cache):
    with pytest.raises(UserError) as caught:
        create_backbone("timm:hf_hub:acme/not-here", pretrained=False)  # the architecture needs config.json
    message = str(caught.value)
    assert "\n" not in message and str(hub_cache) in message
    assert "config.json" in message and "hf download acme/not-here" in message and "HF_HOME" in message
    with pytest.raises(UserError, match="acme/not here"):
        create_backbone("timm:hf_hub:acme/not here", pretrained=False)


# -- bad input
def test_a_repo_id_with_spaces_is_one_line_before_any_export_work(tmp_path, capsys):
    code = run_main(export_main, "ckpt_path=/nonexistent/best.ckpt", "format=hf", "push=true",
                    "repo_id=my model", f"hydra.run.dir={tmp_path / 'e'}")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "repo_id='my model'" in err and "best.ckpt" not in err


def test_an_offline_push_is_one_line_and_leaves_the_folder_written(run_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", OFFLINE)
    code = run_main(export_main, f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}", "format=hf", "push=true",
                    "repo_id=someone/tiny", "parity_images=4", f"hydra.run.dir={tmp_path / 'e'}")  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: push to someone/tiny failed") and OFFLINE in last
    assert {"model.safetensors", "config.json", "README.md"} <= {
        p.name for p in (tmp_path / "e" / "hf").iterdir()
    }


def test_a_folder_missing_a_file_is_one_line_naming_it(folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").unlink()
    code = run_main(predict_main, f"ckpt_path={broken}", f"inputs={folder / 'confusion_matrix.png'}",
                    f"hydra.run.dir={tmp_path / 'p'}")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no model.safetensors" in err and str(broken) in err
    with pytest.raises(UserError, match="cannot resume"):  # weights only: no optimizer state to resume
        AtomicCheckpointIO().load_checkpoint(folder)
