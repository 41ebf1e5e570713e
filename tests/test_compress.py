"""Compression: an int8 ONNX model that is >= 3x smaller and agrees with fp32 on real images; a pruned
model with fewer channels that still trains and reloads bit-identically; bad input is one line, exit 2,
and nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import compose_cfg, fashion_mnist_test_images, run
from PIL import Image
from torch import nn

from visiontune import compress as compress_module
from visiontune.cli import run_cli
from visiontune.compress import CHANNEL_MULTIPLE, compress, finetune, prune_channels, save_pruned
from visiontune.deploy.preprocess import load_spec, preprocess_image
from visiontune.deploy.session import checkpoint_datamodule
from visiontune.training.checkpoints import load_classifier

FIGURES = ("size_mb", "params", "macs", "latency_ms_b1", "latency_ms_b32", "test_acc")
QUICK = ["latency_runs=5", "test_subset=64"]


@pytest.fixture(scope="module")
def lite0_checkpoint(tmp_path_factory):
    """EfficientNet-Lite0 with its ImageNet weights, a linear probe on 640 Fashion-MNIST images at 32 px:
    a model whose predictions mean something (about 60% test accuracy), trained in seconds."""
    from visiontune.train import train

    run_dir = tmp_path_factory.mktemp("lite0_run")
    overrides = ["data.train_subset=640", "data.val_subset=64", "data.test_subset=128", "data.image_size=32",
                 "data.batch_size=32", "optimizer.lr=0.01", "finetune=linear_probe", "trainer.max_epochs=2",
                 "trainer.num_sanity_val_steps=0", "callbacks.progress.refresh_rate=0", "logger=csv"]  # fmt: skip
    train(compose_cfg(overrides, run_dir))
    return run_dir / "checkpoints" / "best.ckpt"


def compress_cfg(ckpt, out, *overrides):
    return compose_cfg([f"ckpt_path={ckpt}", *overrides], out, config_name="compress")


def real_batch(spec: dict, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """n real Fashion-MNIST test images, preprocessed from preprocess.json alone (as a deployer would),
    and their labels."""
    pairs = fashion_mnist_test_images(n, start=2000)
    images = np.stack([preprocess_image(Image.fromarray(a).convert("RGB"), spec) for a, _ in pairs])
    return images, np.array([label for _, label in pairs])


def session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def predict(sess, batch: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: batch})[0]


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".compress-") or p.suffix == ".tmp")


# ------------------------------------------------------------------ int8


@pytest.fixture(scope="module")
def int8_run(lite0_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    before = lite0_checkpoint.read_bytes()
    result = compress(
        compress_cfg(lite0_checkpoint, out, "method=int8", "calib_images=128", *QUICK), patch={}
    )
    return out, result, before


def test_int8_model_is_3x_smaller_and_agrees_with_fp32_on_real_images(int8_run, lite0_checkpoint):
    out, result, before = int8_run
    assert {"model.onnx", "model.int8.onnx", "preprocess.json", "compress.json"} <= {
        p.name for p in out.iterdir()
    }
    assert leftovers(out) == []
    assert lite0_checkpoint.read_bytes() == before  # the input is only read

    fp32_bytes, int8_bytes = (out / "model.onnx").stat().st_size, (out / "model.int8.onnx").stat().st_size
    assert fp32_bytes / int8_bytes >= 3
    spec = load_spec(out / "preprocess.json")
    batch, labels = real_batch(spec)
    fp32, int8 = predict(session(out / "model.onnx"), batch), predict(session(out / "model.int8.onnx"), batch)
    assert int8.shape == fp32.shape == (len(batch), 10)
    np.testing.assert_allclose(int8.sum(1), 1.0, atol=1e-4)  # the softmax stays float
    # the fp32 model really discriminates, so the agreement below is not that of two constant models
    assert len(set(fp32.argmax(1))) >= 5 and (fp32.argmax(1) == labels).mean() >= 0.4
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.9
    assert predict(session(out / "model.int8.onnx"), batch[:1]).shape == (1, 10)  # dynamic batch axis


def test_compress_json_reports_both_models(int8_run):
    out, result, _ = int8_run
    saved = json.loads((out / "compress.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for name in ("fp32", "int8"):
        assert all(saved[name][key] > 0 for key in FIGURES if key != "test_acc")
        assert 0 <= saved[name]["test_acc"] <= 1
    assert saved["int8"]["size_mb"] == pytest.approx((out / "model.int8.onnx").stat().st_size / 1e6)
    # quantization keeps the graph's shape; the note says the figures are the fp32 graph's
    assert saved["int8"]["macs"] == saved["fp32"]["macs"] and "fp32 graph" in saved["int8"]["note"]
    assert saved["threads"] == 2 and saved["test_images"] == 64 and 0.8 <= saved["top1_agreement"] <= 1


# ------------------------------------------------------------------ prune


@pytest.mark.parametrize(
    "which", ["tiny_checkpoint", "lite0_checkpoint"]
)  # a small test net, EfficientNet-Lite0
def test_pruned_model_is_narrower_still_trains_and_reloads_identically(which, request, tmp_path):
    ckpt = request.getfixturevalue(which)
    model = load_classifier(ckpt)
    widths, params = conv_widths(model), sum(p.numel() for p in model.parameters())
    prune_channels(model, 0.3, 32)

    pruned = conv_widths(model)
    assert len(pruned) == len(widths) and all(p <= w for p, w in zip(pruned, widths, strict=True))
    assert sum(pruned) < 0.8 * sum(widths) and sum(p.numel() for p in model.parameters()) < 0.75 * params
    assert all(
        p % CHANNEL_MULTIPLE == 0 for p, w in zip(pruned, widths, strict=True) if w % CHANNEL_MULTIPLE == 0
    )
    assert model.head[-1].out_features == 10  # the class outputs are never pruned
    transform = checkpoint_datamodule(model).eval_transform()
    images = torch.stack(
        [transform(Image.fromarray(a).convert("RGB")) for a, _ in fashion_mnist_test_images(6)]
    )
    with torch.no_grad():
        assert model.eval()(images).shape == (6, 10)

    datamodule = checkpoint_datamodule(model, {"train_subset": 48, "val_subset": 16, "batch_size": 16})
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    metrics = finetune(model, datamodule, 1, {"accelerator": "cpu", "devices": 1}, tmp_path, lr=1e-3,
                       max_steps=3, limit_val_batches=1)  # fmt: skip
    assert np.isfinite(metrics["train/loss"])
    modules = dict(model.named_modules())
    unchanged = [n for n, w in weights.items() if torch.equal(w, modules[n].weight)]
    assert unchanged == []  # every (pruned) convolution trains

    save_pruned(model, tmp_path / "pruned.ckpt", {"amount": 0.3})
    reloaded = load_classifier(tmp_path / "pruned.ckpt")  # weights_only=True, no pruning library involved
    assert conv_widths(reloaded) == pruned
    with torch.no_grad():
        assert torch.equal(reloaded(images), model.eval()(images))


def test_prune_command_writes_a_smaller_model_that_every_command_loads(tiny_checkpoint, tmp_path):
    before = tiny_checkpoint.read_bytes()
    # A pruned model can be ill-conditioned (logits near 40 on real images): there, fp32 alone (PyTorch
    # or ONNX Runtime, against float64) moves a probability by about 1e-4, and by how much depends on how
    # many threads trained it. The parity of well-conditioned models at 1e-4 is test_export's.
    cfg = compress_cfg(tiny_checkpoint, tmp_path, "method=prune", "amount=0.3", "finetune_epochs=1",
                       "finetune_lr=0.001", "tolerance=1e-3", *QUICK)  # fmt: skip
    result = compress(cfg, patch={"train_subset": 64, "val_subset": 32})
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.onnx", "model.pruned.onnx", "pruned.ckpt", "preprocess.json", "compress.json"} <= names
    assert leftovers(tmp_path) == [] and tiny_checkpoint.read_bytes() == before

    fp32, pruned = result["fp32"], result["pruned"]
    assert all(key in pruned for key in FIGURES)
    for key in ("params", "macs", "channels", "size_mb"):
        assert pruned[key] < 0.8 * fp32[key], key
    assert pruned["finetune_epochs"] == 1 and "train_loss" in pruned["finetune"]
    assert pruned["bn_recalibration_images"] == 64  # the whole (patched) training subset

    reloaded = load_classifier(tmp_path / "pruned.ckpt")
    assert sum(p.numel() for p in reloaded.parameters()) == pruned["params"]
    batch, _ = real_batch(load_spec(tmp_path / "preprocess.json"), n=8)
    with torch.no_grad():
        expected = reloaded(torch.from_numpy(batch)).softmax(-1).numpy()
    np.testing.assert_allclose(predict(session(tmp_path / "model.pruned.onnx"), batch), expected, atol=1e-3)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "overrides, key",
    [(["method=prune", "amount=1.5"], "amount"), (["method=prune", "amount=0"], "amount"),
     (["method=fp16"], "method"), (["method=int8", "calib_images=0"], "calib_images"),
     (["method=int8", "tolerance=0"], "tolerance")],
)  # fmt: skip
def test_bad_values_are_one_line_and_exit_2(overrides, key, tiny_checkpoint, tmp_path, capsys):
    before = tiny_checkpoint.read_bytes()
    with pytest.raises(SystemExit) as stop:
        run_cli(compress, compress_cfg(tiny_checkpoint, tmp_path / "run", *overrides))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and key in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and tiny_checkpoint.read_bytes() == before


def test_a_checkpoint_that_is_not_ours_is_one_line_and_exit_2(tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2, 3)}, foreign)
    before = foreign.read_bytes()
    result = run(
        "visiontune.compress", f"ckpt_path={foreign}", "method=int8", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "not a visiontune checkpoint" in result.stderr
    assert foreign.read_bytes() == before and not (tmp_path / "run" / "compress.json").exists()


def test_the_run_dir_may_not_overwrite_the_input(tiny_checkpoint, tmp_path, capsys):
    pruned = tmp_path / "pruned.ckpt"
    pruned.write_bytes(tiny_checkpoint.read_bytes())
    with pytest.raises(SystemExit) as stop:
        run_cli(compress, compress_cfg(pruned, tmp_path, "method=prune"))
    assert stop.value.code == 2 and "overwrite the input checkpoint" in capsys.readouterr().err
    assert pruned.read_bytes() == tiny_checkpoint.read_bytes()


def test_a_failed_compression_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """The exported files exist in the temporary folder when quantization fails: none reach the run dir."""

    def fake_export(ckpt_path, out_dir, patch, tolerance):
        (out_dir / "model.onnx").write_bytes(b"half")
        (out_dir / "preprocess.json").write_text("{}")
        return {}

    def failing_quantize(*args, **kwargs):
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(compress_module, "export_onnx", fake_export)
    monkeypatch.setattr(compress_module, "quantize_int8", failing_quantize)
    before = tiny_checkpoint.read_bytes()
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        compress(compress_cfg(tiny_checkpoint, tmp_path, "method=int8", "calib_images=8"), patch={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and tiny_checkpoint.read_bytes() == before


def test_reduce_range_auto_is_on_for_x86_without_vnni_only():
    from visiontune.compress import x86_without_vnni

    assert x86_without_vnni("x86_64", "flags : fpu sse4_2 avx2 fma")
    assert not x86_without_vnni("x86_64", "flags : fpu avx2 avx512f avx512_vnni")
    assert not x86_without_vnni("x86_64", "flags : fpu avx2 avx_vnni")
    assert not x86_without_vnni("aarch64", "Features : fp asimd")
