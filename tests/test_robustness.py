"""Corruptions (seeded tensor ops, severities 1..5) and the robustness eval built on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import compose_cfg, fashion_mnist_test_images
from torch.utils.data import Subset
from torchvision.transforms.v2 import functional as TF

from visiontune.config import validate_eval_config
from visiontune.deploy.session import InferenceSession
from visiontune.eval import evaluate
from visiontune.evaluation.corruptions import (
    CORRUPTIONS,
    RANDOM,
    SEVERITIES,
    SEVERITY,
    corrupt,
    corrupt_indexed,
    trail_kernel,
)
from visiontune.evaluation.robustness import CLEAN, read_csv, subset_indices


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """8 real Fashion-MNIST test images, resized to 32 px and expanded to RGB: uint8 (8, 3, 32, 32)."""
    x = torch.stack([torch.from_numpy(a) for a, _ in fashion_mnist_test_images(8)]).unsqueeze(1)
    return TF.resize(x, [32, 32], antialias=True).expand(-1, 3, -1, -1).contiguous()


def as_dtype(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return images if dtype == torch.uint8 else images.float() / 255


def mean_abs_change(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = 255.0 if a.dtype == torch.uint8 else 1.0
    return float((a.float() - b.float()).abs().mean()) / scale


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_corruption_has_five_severities():
    assert len(CORRUPTIONS) >= 10 and set(RANDOM) < set(CORRUPTIONS)
    assert all(len(SEVERITY[name]) == len(SEVERITIES) == 5 for name in CORRUPTIONS)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["uint8", "float"])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_grows_with_severity_and_keeps_dtype_and_range(images, name, dtype):
    x = as_dtype(images, dtype)
    outs = {s: corrupt(x, name, s, seeded(0)) for s in (1, 5)}
    for out in outs.values():
        assert out.shape == x.shape and out.dtype == dtype
        assert out.min() >= 0 and out.max() <= (255 if dtype == torch.uint8 else 1.0)
    mild, severe = mean_abs_change(outs[1], x), mean_abs_change(outs[5], x)
    assert mild > 0, f"{name} leaves the image unchanged at severity 1"
    assert severe > mild, f"{name}: severity 5 changes the image less ({severe}) than severity 1 ({mild})"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_a_function_of_the_seed(images, name):
    a = corrupt(images, name, 3, seeded(1))
    assert torch.equal(a, corrupt(images, name, 3, seeded(1)))
    other = corrupt(images, name, 3, seeded(2))
    assert torch.equal(a, other) == (name not in RANDOM), "only the random corruptions depend on the seed"


def test_corruptions_leave_the_global_rng_alone(images):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for name in CORRUPTIONS:
        corrupt(images.float() / 255, name, 5, seeded(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_an_image_corrupts_the_same_way_in_any_batch(images):
    indices = torch.arange(100, 108)
    for name in sorted(RANDOM):
        whole = corrupt_indexed(images, indices, name, 4, seed=7)
        part = corrupt_indexed(images[5:7], indices[5:7], name, 4, seed=7)
        assert torch.equal(whole[5:7], part), name
        assert not torch.equal(whole, corrupt_indexed(images, indices, name, 4, seed=8)), name


def test_a_single_image_and_a_grey_channel_are_accepted(images):
    single = corrupt(images[0], "gaussian_noise", 2, seeded(3))
    assert single.shape == images[0].shape
    assert torch.equal(single, corrupt(images[:1], "gaussian_noise", 2, seeded(3))[0])
    for name in CORRUPTIONS:
        assert corrupt(images[:, :1], name, 5, seeded(0)).shape == images[:, :1].shape


def test_bad_names_and_severities_are_refused(images):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "contrast", 6)


def test_brightness_raises_the_hsv_value_as_imagenet_c_does():
    x = torch.tensor([[[0.0, 0.5]], [[0.0, 0.25]], [[0.0, 0.0]]])  # a black and an orange pixel
    c = SEVERITY["brightness"][4]
    out = corrupt(x, "brightness", 5)
    assert torch.allclose(out[:, 0, 0], torch.full((3,), c))  # black turns grey
    assert torch.allclose(out[:, 0, 1], x[:, 0, 1] * (0.5 + c) / 0.5)  # hue and saturation kept


def test_motion_blur_kernel_is_a_normalised_ray():
    kernel = trail_kernel(2.0, 0.0)
    centre = kernel.shape[0] // 2
    assert torch.isclose(kernel.sum(), torch.tensor(1.0))
    assert kernel[centre, centre:].sum() > 0.99  # angle 0: the centre row, one side only


def test_robustness_subset_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), 25)
    keep = subset_indices(labels, 20, seed=0)
    assert np.bincount(labels[keep]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(keep, subset_indices(labels, 20, seed=0))
    assert len(subset_indices(labels, None, seed=0)) == 100 and len(subset_indices(labels, 500, 0)) == 100


def test_robustness_settings_are_validated(tmp_path):
    from visiontune.errors import UserError

    cfg = compose_cfg(["ckpt_path=x.ckpt", "robustness_subset=0"], tmp_path, config_name="eval")
    with pytest.raises(UserError, match="robustness_subset=0"):
        validate_eval_config(cfg)


def test_robustness_eval_writes_its_table_figure_and_metrics(tiny_checkpoint, tmp_path):
    cfg = compose_cfg(
        [f"ckpt_path={tiny_checkpoint}", "robustness=true", "robustness_subset=20", "report.enabled=false"],
        tmp_path,
        config_name="eval",
    )
    metrics = evaluate(cfg, patch={})
    rows = read_csv(tmp_path / "robustness.csv")
    assert len(rows) == 1 + len(CORRUPTIONS) * len(SEVERITIES)
    assert rows[0]["corruption"] == CLEAN and rows[0]["severity"] == 0
    assert {(r["corruption"], r["severity"]) for r in rows[1:]} == {
        (n, s) for n in CORRUPTIONS for s in SEVERITIES
    }
    assert (tmp_path / "robustness.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["robust/images"] == 20
    assert saved["robust/mean_acc"] == pytest.approx(np.mean([r["accuracy"] for r in rows[1:]]), abs=1e-4)
    assert saved["robust/contrast"] == pytest.approx(
        np.mean([r["accuracy"] for r in rows if r["corruption"] == "contrast"]), abs=1e-4
    )
    # the clean pass is the plain test accuracy on the same 20 images, through the normal eval transform
    session = InferenceSession.from_checkpoint(tiny_checkpoint, "cpu")
    datamodule = session.datamodule
    datamodule.setup("test")
    keep = subset_indices(datamodule.test_set.labels, 20, seed=cfg.robustness_seed)
    logits, targets, _ = session.collect(Subset(datamodule.test_set, keep.tolist()))
    targets = targets["class"]
    expected = float((logits.argmax(1) == targets).float().mean())
    assert saved["robust/clean_acc"] == pytest.approx(expected) == rows[0]["accuracy"]
    assert metrics["robust/mean_acc"] == saved["robust/mean_acc"]


def test_the_clean_path_is_the_eval_transform_cut_in_two(images):
    from PIL import Image

    from visiontune.data.transforms import eval_geometry, eval_transform, normalise

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for crop_pct in (1.0, 0.875):
        geometry = eval_geometry(32, "bilinear", crop_pct)
        finish = normalise((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        whole = eval_transform(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear", crop_pct)
        assert geometry(picture).dtype == torch.uint8
        assert torch.equal(finish(geometry(picture)), whole(picture))
        grey = images[:3, :1]
        batch = torch.stack([geometry(g) for g in grey])  # normalised as a batch, as the robustness passes do
        assert torch.equal(finish(batch), torch.stack([whole(g) for g in grey]))


def test_a_grey_source_stays_grey_under_noise(images):
    from visiontune.evaluation.robustness import corrupt_split, is_grey

    assert is_grey(images) and not is_grey(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    out = corrupt_split(images, torch.arange(8), "gaussian_noise", 5, seed=0, grey=True)
    assert out.shape == images.shape and is_grey(out) and not torch.equal(out, images)
