"""Parameter-efficient fine-tuning: finetune=lora (peft), bitfit and norm.

Each trains its own few tensors and the head, and nothing else moves; LoRA merges into the weights for
export with the same outputs; a run writes adapter.safetensors, which rebuilds the model from the
pretrained backbone; a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    FAST,
    SMALL,
    TINY,
    CrashAt,
    changed,
    compose_cfg,
    fashion_mnist_test_images,
    make_run,
    run_main,
    snapshot,
    write_images,
)
from safetensors.torch import load_file

from visiontune.deploy.session import InferenceSession
from visiontune.errors import UserError
from visiontune.eval import main as eval_main
from visiontune.export import main as export_main
from visiontune.models.adapters import auto_targets, lora_layers, merge_lora
from visiontune.predict import main as predict_main
from visiontune.serve import create_app
from visiontune.train import main as train_main
from visiontune.train import train
from visiontune.training.checkpoints import load_checkpoint, load_classifier
from visiontune.training.module import ImageClassifier

LORA = {"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target": "auto"}}
STATS = ("running_mean", "running_var", "num_batches_tracked")


def lora_model(backbone: str = SMALL, **lora) -> ImageClassifier:
    finetune = {**LORA, "lora": {**LORA["lora"], **lora}}
    return ImageClassifier({"backbone": backbone, "pretrained": False}, 10, optim={"finetune": finetune})


@pytest.mark.parametrize("name", ["bitfit", "norm", "lora"])
def test_each_strategy_trains_its_tensors_and_the_head_and_nothing_else(name):
    finetune = LORA if name == "lora" else {"name": name}
    trainer, model, datamodule, _ = make_run(finetune, backbone=SMALL, limit_train_batches=4)
    selected = {f"backbone.{n}" for n in model.freeze_schedule.selected}
    before = snapshot(model)
    trainer.fit(model, datamodule=datamodule)
    after = snapshot(model)
    moved = changed(before, after, "backbone.")
    stats = {k for k in moved if k.endswith(STATS)}
    assert moved - stats <= selected, sorted(moved - stats - selected)[:5]
    assert len(moved - stats) >= len(selected) // 2  # they train (a LoRA A moves once its B has)
    assert changed(before, after, "head.")
    # BatchNorm statistics adapt under norm only; every other tensor of the backbone is bit-identical
    assert bool(stats) == (name == "norm")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = sum(p.numel() for n, p in model.named_parameters() if n in selected or n.startswith("head."))
    assert trainable == expected


def test_lora_wraps_the_auto_targets_and_its_tensors_take_their_layers_group_lr():
    model = lora_model()
    wrapped = {name.removeprefix("backbone.body.") for name, _ in lora_layers(model)}
    plain = ImageClassifier({"backbone": SMALL, "pretrained": False}, 10).backbone
    assert wrapped == set(auto_targets(plain)) and wrapped
    groups = model.param_groups()
    group_of = {id(p): g for g in groups for p in g["params"]}
    for i, named in enumerate(model.backbone.group_parameters()):
        for name, p in named:
            if ".lora_" in name:
                assert group_of[id(p)]["group_index"] == i
                assert group_of[id(p)]["lr"] == pytest.approx(groups[-1]["lr"])  # layer_decay 1, mult 1


def test_lora_only_in_the_groups_not_named_and_a_frozen_bottom():
    model = ImageClassifier(
        {"backbone": SMALL, "pretrained": False},
        10,
        optim={"finetune": {**LORA, "groups": "0:4"}},
    )
    assert model.freeze_schedule.frozen_groups(0) >= {0, 1, 2, 3}
    groups = [g.name for g in model.backbone.groups]
    adapted = {n for n in model.freeze_schedule.selected}
    for i, named in enumerate(model.backbone.group_parameters()):
        assert bool({n for n, _ in named} & adapted) == (i >= 4), groups[i]


def test_merged_lora_gives_the_unmerged_outputs_and_leaves_a_plain_backbone():
    torch.manual_seed(0)
    model = lora_model().eval()
    for _, layer in lora_layers(model):  # B starts at zero: give the updates something to merge
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b.weight, std=0.1)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        unmerged = model(x)
        assert merge_lora(model) > 0
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not lora_layers(model)
    plain = ImageClassifier({"backbone": SMALL, "pretrained": False}, 10)
    assert set(model.state_dict()) == set(plain.state_dict())


def test_a_lora_run_resumes_exactly(tmp_path):
    run = [*FAST, "finetune=lora", "finetune.lora.r=4", "finetune.lora.dropout=0.1", "trainer.max_epochs=2",
           "scheduler=cosine", "logger=csv"]  # fmt: skip
    train(compose_cfg(run, tmp_path / "straight"))
    with pytest.raises(RuntimeError, match="simulated crash"):  # the same run, crashed as epoch 1 starts
        train(compose_cfg(run, tmp_path / "cut"), callbacks=[CrashAt(epoch=1, batch=0)])
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    train(compose_cfg([*run, f"ckpt_path={last}"], tmp_path / "cut"))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")["state_dict"]
    resumed = load_checkpoint(last)["state_dict"]
    assert any(".lora_" in k for k in straight)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.fixture(scope="module")
def lite0_lora_run(tmp_path_factory):
    """Lite0 (its real ImageNet weights) with LoRA on a tiny Fashion-MNIST subset: adapter.safetensors."""
    out = tmp_path_factory.mktemp("lite0_lora")
    train(compose_cfg([*TINY, "model=efficientnet_lite0", "finetune=lora", "logger=csv"], out))
    return out


def test_the_adapter_file_holds_the_trained_tensors_and_rebuilds_the_model(lite0_lora_run, capsys):
    adapter = lite0_lora_run / "adapter.safetensors"
    checkpoint = load_checkpoint(lite0_lora_run / "checkpoints" / "best.ckpt")
    tensors = load_file(str(adapter))
    full = checkpoint["state_dict"]
    assert set(tensors) == {k for k in full if ".lora_" in k or k.startswith("head.")}
    for key, value in tensors.items():
        assert torch.equal(value, full[key])
    assert adapter.stat().st_size < 2e6 and json.loads((lite0_lora_run / "adapter.json").read_text())["model"]
    metrics = json.loads((lite0_lora_run / "metrics.json").read_text())
    assert metrics["adapter_mb"] == pytest.approx(adapter.stat().st_size / 1e6, abs=1e-3)

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        from_adapter = load_classifier(adapter).predict_proba(x)
        from_checkpoint = load_classifier(lite0_lora_run / "checkpoints" / "best.ckpt").predict_proba(x)
    torch.testing.assert_close(from_adapter, from_checkpoint, atol=1e-6, rtol=0)
    # eval reads the adapter as a checkpoint, and finds the run's test accuracy
    assert run_main(eval_main, f"ckpt_path={adapter}", f"hydra.run.dir={lite0_lora_run / 'eval'}") == 0
    evaluated = json.loads((lite0_lora_run / "eval" / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_export_merges_lora_and_the_exported_model_matches_the_checkpoint(tmp_path):
    train(compose_cfg([*FAST, "finetune=lora", "logger=csv"], tmp_path / "run"))
    out = tmp_path / "export"
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    # TorchScript: the same merged module as ONNX (Deployable), exported in a second instead of several
    args = [f"ckpt_path={ckpt}", "format=torchscript", "parity_images=8", f"hydra.run.dir={out}"]
    assert run_main(export_main, *args) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["model_max_abs_diff"] <= 1e-4 and report["max_abs_diff"] <= 1e-4
    exported = torch.jit.load(str(out / "model.torchscript.pt"))
    assert not [
        n for n, _ in exported.named_parameters() if "lora" in n
    ]  # plain layers, the updates folded in


def test_a_target_that_matches_no_layer_names_some_that_exist():
    with pytest.raises(UserError, match=r"matches no Linear or Conv2d layer .*some that exist: .*conv"):
        lora_model(target=["nosuch.*"])


@pytest.mark.parametrize(
    ("override", "words"),
    [("finetune.lora.r=0", "finetune.lora.r"), ("finetune.soft_freeze=true", "soft_freeze")],
)
def test_bad_lora_settings_are_one_line_and_exit_2(override, words, tmp_path, capsys):
    code = run_main(train_main, *FAST, "finetune=lora", override, f"hydra.run.dir={tmp_path / 'run'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and words in err[-1], err[-3:]
    assert not (tmp_path / "run").exists()


def test_lora_on_a_vit_adapts_attention_and_mlp_and_trains_only_them():
    """timm's test ViT at random init (no ViT weights here): the mechanics of the attention targets."""
    trainer, model, datamodule, _ = make_run(LORA, backbone="timm:test_vit", limit_train_batches=2)
    wrapped = [name.removeprefix("backbone.body.") for name, _ in lora_layers(model)]
    blocks = len(model.backbone.body.blocks)
    assert sorted(wrapped) == sorted(
        f"blocks.{i}.{layer}"
        for i in range(blocks)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    before = snapshot(model)
    trainer.fit(model, datamodule=datamodule)
    moved = changed(before, snapshot(model), "backbone.")
    assert moved and all(".lora_" in k for k in moved)


# ---------------------------------------------------------------- one backbone, several adapters


@pytest.fixture(scope="module")
def two_adapters(lite0_lora_run, tmp_path_factory):
    """Two adapters of Lite0: the LoRA run's, and a BitFit run's on the same tiny data."""
    out = tmp_path_factory.mktemp("lite0_bitfit")
    train(compose_cfg([*TINY, "model=efficientnet_lite0", "finetune=bitfit", "logger=csv"], out))
    return {"lora": str(lite0_lora_run / "adapter.safetensors"), "bitfit": str(out / "adapter.safetensors")}


def test_a_two_task_service_answers_each_task_as_its_own_service(two_adapters):
    from fastapi.testclient import TestClient
    from test_serve import png_bytes

    images = [png_bytes(array) for array, _ in fashion_mnist_test_images(3)]
    sessions = InferenceSession.from_adapters(two_adapters, "cpu")
    lora, bitfit = (sessions[name].model for name in ("lora", "bitfit"))
    # the backbone is held once: the BitFit model's frozen conv weights are the LoRA model's base weights
    base = dict(lora.backbone.named_parameters())
    conv = "body.blocks.1.0.conv_pw.weight"
    assert bitfit.backbone.get_parameter(conv) is base[conv.replace(".weight", ".base_layer.weight")]
    with TestClient(create_app(sessions)) as both:
        assert both.get("/health").json()["tasks"].keys() == {"lora", "bitfit"}
        for name, path in two_adapters.items():
            with TestClient(create_app(InferenceSession.from_checkpoint(path, "cpu"))) as alone:
                for image in images:
                    shared = both.post(f"/predict?task={name}", content=image)
                    assert (
                        shared.status_code == 200
                        and shared.json() == alone.post("/predict", content=image).json()
                    )
        unknown = both.post("/predict?task=digits", content=images[0])
        assert (
            unknown.status_code == 404
            and "lora" in unknown.json()["error"]
            and "bitfit" in unknown.json()["error"]
        )
        assert both.post("/predict", content=images[0]).status_code == 400  # which task?


def test_predict_with_adapters_writes_one_csv_per_task_as_each_alone(two_adapters, tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 4)
    both = [
        "inputs=" + str(folder),
        "adapters={" + ", ".join(f"{k}: {v}" for k, v in two_adapters.items()) + "}",
    ]
    assert run_main(predict_main, *both, f"hydra.run.dir={tmp_path / 'both'}") == 0
    for name, path in two_adapters.items():
        assert (
            run_main(
                predict_main, f"inputs={folder}", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / name}"
            )
            == 0
        )
        alone = (tmp_path / name / "predictions.csv").read_text()
        assert (tmp_path / "both" / f"predictions_{name}.csv").read_text() == alone


@pytest.mark.parametrize(
    ("adapters", "words"),
    [
        ("{a: x.safetensors, a: y.safetensors}", "a is given twice"),
        ("{a: runs/best.ckpt}", "not an adapter file"),
        ("{a: missing/adapter.safetensors}", "does not exist"),
    ],
)
def test_bad_adapters_are_one_line_and_exit_2(adapters, words, tmp_path, capsys):
    code = run_main(
        predict_main, f"inputs={tmp_path}", f"adapters={adapters}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and words in err[-1], err[-3:]


def test_lora_above_frozen_groups_trains_on_their_cached_output(tmp_path):
    """finetune.cache_features=true is refused where the cache is not exact: here it is taken."""
    run = [*FAST, "finetune=lora", "finetune.groups=0:3", "finetune.cache_features=true", "logger=csv"]
    train(compose_cfg(run, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["feature_cache_s"] > 0 and metrics["test/acc"] >= 0


def test_adapters_of_two_backbones_are_refused_in_one_line(monkeypatch):
    """One service shares one backbone: a second backbone is named, with the fix."""

    def loaded(path, device="auto"):
        backbone = "efficientnet_lite1" if "b" in path else "efficientnet_lite0"
        return SimpleNamespace(model=SimpleNamespace(hparams=SimpleNamespace(model={"backbone": backbone})))

    monkeypatch.setattr(InferenceSession, "from_checkpoint", staticmethod(loaded))
    with pytest.raises(
        UserError, match=r"adapters: b is for efficientnet_lite1, a for efficientnet_lite0: one service"
    ):
        InferenceSession.from_adapters({"a": "x.safetensors", "b": "b.safetensors"}, "cpu")
