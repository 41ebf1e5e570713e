"""Test-time adaptation (adapt=bn|tent): what each method changes, on a copy only; the refusals; eval and
predict through it."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest
import timm
import torch
from helpers import compose_cfg, run_main
from torch import nn

from visiontune.config import validate_eval_config
from visiontune.deploy.session import InferenceSession
from visiontune.errors import UserError
from visiontune.eval import main as eval_main
from visiontune.evaluation import robustness
from visiontune.evaluation.adapt import AdaptSettings, entropy, make_adapter
from visiontune.models.heads import Head
from visiontune.predict import predict

HEADS = [Head(name="class", kind="multiclass", classes=("a", "b", "c"), start=0)]
AFFINE = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()


def shifted(n: int, seed: int) -> torch.Tensor:
    """A batch far from the (random-init) model's BatchNorm statistics: a new domain."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 3 + 2


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def norm_affine_keys(model: nn.Module) -> set[str]:
    return {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, AFFINE)
        for p in ("weight", "bias")
    }


def file_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bn_re_estimates_only_the_batchnorm_statistics_image_weighted():
    model = tiny_model()
    original = state(model)
    adapter = make_adapter(model, AdaptSettings(method="bn", shuffle=False), HEADS, batch_size=6)
    a, b = shifted(6, 1), shifted(2, 2)
    adapter(a)
    adapter(b)
    bn_buffers = {
        f"{name}.{buf}"
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for buf in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert changed(original, adapter.model) == bn_buffers  # every BN buffer, nothing else
    assert changed(original, model) == set()  # the model it was given is untouched
    # the first BN sees the stem's output: its estimate is the mean over all 8 images, not of the 2 batches
    with torch.no_grad():
        stem = model.conv_stem(torch.cat([a, b]))
    assert torch.allclose(adapter.model.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-4)
    assert not torch.allclose(adapter.model.bn1.running_mean, (stem[:6].mean((0, 2, 3)) + stem[6:].mean((0, 2, 3))) / 2, atol=1e-3)  # fmt: skip
    # the batch is classified with the adapted statistics (eval mode), so its logits are the copy's own
    with torch.no_grad():
        assert torch.allclose(adapter(b), adapter.model.eval()(b), atol=1e-5)
        assert not torch.allclose(model(b), adapter.model(b), atol=1e-3)
    adapter.reset()
    assert changed(original, adapter.model) == set()


def test_tent_trains_only_the_norm_affine_parameters_and_reset_restores_them():
    model = tiny_model()
    original = state(model)
    x = shifted(8, 3)
    adapter = make_adapter(model, AdaptSettings(method="tent", lr=1e-2, steps=3), HEADS, batch_size=8)
    with torch.no_grad():
        first = adapter(x)  # the prediction comes from the forward before the last step
        adapter.model.train()
        before, after = entropy(first, HEADS), entropy(adapter.model(x), HEADS)
    assert after < before  # the entropy it minimises went down
    moved = changed(original, adapter.model)
    assert moved and moved <= norm_affine_keys(model)  # running stats, convs and the classifier bit-identical
    assert changed(original, model) == set()
    adapter.reset()
    assert changed(original, adapter.model) == set()


def test_tent_reset_batch_is_episodic_and_never_keeps_adapting():
    model, x = tiny_model(), shifted(8, 4)
    episodic = make_adapter(model, AdaptSettings(method="tent", lr=1e-2, reset="batch"), HEADS, 8)
    online = make_adapter(model, AdaptSettings(method="tent", lr=1e-2, reset="never"), HEADS, 8)
    assert torch.equal(episodic(x), episodic(x))
    assert not torch.allclose(online(x), online(x), atol=1e-4)


@pytest.mark.parametrize(
    ("model", "settings", "batch_size", "message"),
    [
        (tiny_model(), AdaptSettings(method="ttt"), 8, "adapt=ttt is unknown"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(3600, 3)), AdaptSettings(method="tent"), 8, "has none"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), AdaptSettings(method="bn"), 8, "no BatchNorm layer"),
        (tiny_model(), AdaptSettings(method="bn"), 1, "batch size of 1"),
        (tiny_model(), AdaptSettings(method="tent", reset="sometimes"), 8, "adapt.reset=sometimes"),
    ],
    ids=["unknown", "tent-no-norms", "bn-no-batchnorm", "bn-batch-of-one", "bad-reset"],
)  # fmt: skip
def test_what_cannot_adapt_is_one_line(model, settings, batch_size, message):
    with pytest.raises(UserError, match=message):
        make_adapter(model, settings, HEADS, batch_size)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapt.method=foo", "adapt.method='foo'"),
        ("adapt.steps=0", "adapt.steps=0"),
        ("adapt.lr=-1", "adapt.lr"),
    ],
)
def test_the_adapt_keys_are_checked(override, message, tmp_path):
    cfg = compose_cfg(["ckpt_path=x.ckpt", "adapt=tent", override], tmp_path, "eval")
    with pytest.raises(UserError, match=message):
        validate_eval_config(cfg)


def test_a_session_adapts_a_copy_and_the_checkpoint_stays_as_it_was(tiny_checkpoint):
    digest = file_hash(tiny_checkpoint)
    session = InferenceSession.from_checkpoint(tiny_checkpoint, "cpu")
    original, x = state(session.model), shifted(8, 5)
    plain = session.logits(x)
    session.adapter = make_adapter(session.model, AdaptSettings(method="bn"), session.heads, batch_size=8)
    adapted = session.logits(x)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert torch.allclose(session.probabilities(adapted).sum(1), torch.ones(8), atol=1e-5)  # the one formula
    assert changed(original, session.model) == set() and file_hash(tiny_checkpoint) == digest
    session.adapter = None
    assert torch.equal(session.logits(x), plain)


def test_eval_with_adapt_bn_through_the_entry_point(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """eval adapt=bn robustness=true (two corruptions at one severity, to stay fast): the adapted test
    metrics, and one more robustness column; then predict on the same split agrees."""
    monkeypatch.setattr(robustness, "CORRUPTIONS", ("contrast", "gaussian_noise"))
    monkeypatch.setattr(robustness, "SEVERITIES", (5,))
    digest = file_hash(tiny_checkpoint)
    out = tmp_path / "e"
    args = [f"ckpt_path={tiny_checkpoint}", "adapt=bn", "report.enabled=false", "robustness=true"]
    code = run_main(eval_main, *args, "robustness_subset=10", f"hydra.run.dir={out}")
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapt"] == "bn" and {
        "robust/mean_acc",
        "robust/bn/mean_acc",
        "robust/bn/clean_acc",
    } <= set(metrics)
    with open(out / "robustness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["corruption", "severity", "accuracy", "accuracy_bn"] and len(rows) == 3
    assert file_hash(tiny_checkpoint) == digest
    # predict on the same split with the same adapter gives the same accuracy, rows in the split's order
    cfg = compose_cfg(
        [f"ckpt_path={tiny_checkpoint}", "inputs=split:test", "adapt=bn"], tmp_path / "p", "predict"
    )
    summary = predict(cfg, patch={})
    assert summary["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    with open(tmp_path / "p" / "predictions.csv", newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)][:3] == ["test[0]", "test[1]", "test[2]"]


def test_eval_refuses_adapt_with_calibrate_in_one_line(tiny_checkpoint, tmp_path, capsys):
    args = [f"ckpt_path={tiny_checkpoint}", "adapt=tent", "calibrate=true", f"hydra.run.dir={tmp_path / 'e'}"]
    code = run_main(eval_main, *args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines()[-1].startswith("error:") and "calibrate=true" in err
    assert not (tmp_path / "e" / "metrics.json").exists()
