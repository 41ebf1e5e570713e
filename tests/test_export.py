"""Export: ONNX and TorchScript files that match PyTorch within 1e-4 on real images preprocessed from
preprocess.json alone, with a dynamic batch axis, the temperature inside, and nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import compose_cfg, fashion_mnist_test_images, run
from PIL import Image

from visiontune.data.transforms import eval_transform
from visiontune.deploy.preprocess import load_spec, make_spec, preprocess_image
from visiontune.deploy.session import checkpoint_datamodule
from visiontune.errors import UserError
from visiontune.export import export
from visiontune.training.checkpoints import load_classifier

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def warm_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with temperature 2 stored, as eval calibrate=true would write it."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["temperature"] = 2.0
    path = tmp_path_factory.mktemp("warm") / "calibrated.ckpt"
    torch.save(checkpoint, path)
    return path


def real_images(n: int = 6) -> list[Image.Image]:
    return [Image.fromarray(array) for array, _ in fashion_mnist_test_images(n, start=500)]


def export_cfg(ckpt, out, *overrides):
    return compose_cfg([f"ckpt_path={ckpt}", *overrides], out, config_name="export")


def check_outputs(out_dir, model_name: str) -> dict:
    names = {p.name for p in out_dir.iterdir()}
    assert {model_name, "preprocess.json", "export.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    result = json.loads((out_dir / "export.json").read_text())
    assert result["max_abs_diff"] <= 1e-4 and result["model_max_abs_diff"] <= 1e-4
    assert result["top1_agreement"] == 1.0 and result["parity_images"] == 32
    return load_spec(out_dir / "preprocess.json")


def reference_probs(ckpt, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_classifier(ckpt).predict_proba(torch.from_numpy(batch)).numpy()


def test_onnx_matches_pytorch_on_images_preprocessed_from_preprocess_json(warm_checkpoint, tmp_path):
    import onnxruntime as ort

    export(export_cfg(warm_checkpoint, tmp_path, "format=onnx"), patch={})
    spec = check_outputs(tmp_path, "model.onnx")
    model = load_classifier(warm_checkpoint)
    assert spec["temperature"] == 2.0 and spec["output"] == "probabilities"
    assert spec["class_names"] == list(model.hparams.class_names) and spec["input_size"] == [3, 32, 32]

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # a dynamic batch axis
    batch = np.stack([preprocess_image(image, spec) for image in real_images()])
    expected = reference_probs(warm_checkpoint, batch)  # softmax(logits / 2)
    for n in (1, 6):
        got = session.run(None, {session.get_inputs()[0].name: batch[:n]})[0]
        assert got.shape == (n, 10)
        assert np.abs(got - expected[:n]).max() <= 1e-4

    # and the deployer's preprocessing is the training transform's
    transform = checkpoint_datamodule(model).eval_transform()
    trained = torch.stack([transform(image) for image in real_images()]).numpy()
    assert np.abs(trained - batch).max() < 1e-5


def test_torchscript_exports_logits_when_asked(warm_checkpoint, tmp_path):
    export(export_cfg(warm_checkpoint, tmp_path, "format=torchscript", "output=logits"), patch={})
    spec = check_outputs(tmp_path, "model.torchscript.pt")
    assert spec["output"] == "logits" and spec["temperature"] == 2.0
    module = torch.jit.load(str(tmp_path / "model.torchscript.pt"))
    batch = np.stack([preprocess_image(image, spec) for image in real_images(5)])
    with torch.no_grad():
        logits = module(torch.from_numpy(batch)).numpy()
        one = module(torch.from_numpy(batch[:1])).numpy()
    assert (
        np.abs(
            torch.from_numpy(logits / spec["temperature"]).softmax(-1).numpy()
            - reference_probs(warm_checkpoint, batch)
        ).max()
        <= 1e-4
    )
    assert np.abs(one - logits[:1]).max() <= 1e-4


def test_a_failed_parity_check_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="parity check failed"):
        export(export_cfg(tiny_checkpoint, tmp_path, "format=torchscript", "tolerance=-1"), patch={})
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_preprocess_json_alone_reproduces_the_eval_transform_exactly(interpolation):
    """Noise and a sharp square, up- and downscaled, cropped or not: a filter, rounding or crop off by
    one would show up as whole grey levels."""
    rng = np.random.default_rng(0)
    canvas = np.zeros((60, 90, 3), dtype=np.uint8)
    canvas[20:40, 50:70] = (250, 120, 30)
    images = [Image.fromarray(canvas)]
    images += [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((17, 300), (301, 45), (64, 64))
    ]
    images += [Image.fromarray(fashion_mnist_test_images(1)[0][0])]
    for size, crop_pct in ((32, 1.0), (32, 0.875), (224, 0.875), (50, 0.95)):
        spec = make_spec(size, crop_pct, interpolation, MEAN, STD, ["a"], 1.0, "probabilities")
        transform = eval_transform(size, MEAN, STD, interpolation, crop_pct)
        for image in images:
            ours, theirs = preprocess_image(image, spec), transform(image).numpy()
            assert ours.shape == theirs.shape == (3, size, size)
            assert np.abs(ours - theirs).max() < 1e-5, (size, crop_pct, image.size)


def test_the_spec_describes_the_checkpoint_preprocessing(tiny_checkpoint):
    datamodule = checkpoint_datamodule(load_classifier(tiny_checkpoint))
    spec = make_spec(datamodule.image_size, datamodule.crop_pct, datamodule.interpolation, datamodule.mean,
                     datamodule.std, datamodule.classes, 1.0, "probabilities")  # fmt: skip
    assert spec["resize"] == {"mode": "exact", "size": [32, 32]}  # Fashion-MNIST: crop_pct 1
    assert (
        spec["mean"] == pytest.approx(list(datamodule.mean))
        and spec["interpolation"] == datamodule.interpolation
    )


def test_an_unknown_format_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path):
    result = run("visiontune.export", f"ckpt_path={tiny_checkpoint}", "format=tflite",
                 f"hydra.run.dir={tmp_path / 'run'}", timeout=300)  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "format=tflite" in last and "onnx" in last
    assert not (tmp_path / "run").exists()  # bad input leaves no run dir behind
