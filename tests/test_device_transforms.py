"""Batched transforms on the device (data.device_transforms): exact eval, per-sample randomness, runs."""

from __future__ import annotations

import pytest
import torch
from helpers import FAST, compose_cfg, fashion_mnist_test_images
from torchvision.transforms import v2

from visiontune.data.device import BatchTransform, batch_generator
from visiontune.data.transforms import eval_transform, train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def fmnist_batch(n=16):
    return torch.stack([torch.from_numpy(a)[None] for a, _ in fashion_mnist_test_images(n)])  # (n, 1, 28, 28)


@pytest.mark.parametrize("size, crop_pct", [(64, 1.0), (32, 1.0), (48, 0.875)])
def test_eval_transform_is_identical_on_both_paths(size, crop_pct):
    x = fmnist_batch()
    per_sample = torch.stack([eval_transform(size, MEAN, STD, "bicubic", crop_pct)(img) for img in x])
    batched = BatchTransform(None, size, MEAN, STD, "bicubic", crop_pct)(x)
    assert batched.dtype == torch.float32 and batched.shape == (16, 3, size, size)
    assert torch.equal(batched, per_sample.as_subclass(torch.Tensor))
    # augment=none trains on exactly the eval tensors
    assert torch.equal(BatchTransform({"name": "none"}, size, MEAN, STD, "bicubic", crop_pct)(x), batched)


def test_flip_is_drawn_per_sample_and_seeded():
    x = fmnist_batch(1).repeat(64, 1, 1, 1)
    flip = BatchTransform({"name": "flip", "hflip": 0.5}, 32, MEAN, STD, "bilinear", 1.0)
    out = flip(x, batch_generator(0, 0, 0))
    plain = BatchTransform(None, 32, MEAN, STD, "bilinear", 1.0)(x[:1])
    flipped = [torch.equal(o, plain[0].flip(-1)) for o in out]
    kept = [torch.equal(o, plain[0]) for o in out]
    assert all(a or b for a, b in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54  # per sample, not per batch
    assert torch.equal(flip(x, batch_generator(0, 0, 0)), out)
    assert not torch.equal(flip(x, batch_generator(0, 0, 1)), out)


def test_random_resized_crop_matches_the_per_sample_statistics():
    scale = (0.25, 1.0)
    t = BatchTransform({"name": "basic", "scale": list(scale), "hflip": 0.0}, 32, MEAN, STD, "bilinear", 1.0)
    g = torch.Generator().manual_seed(0)
    boxes = t.crop_boxes(2000, 28, 28, g)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 28**2
    aspect = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 28).all()
    assert area.min() >= scale[0] - 0.03 and area.max() <= 1.0
    assert aspect.min() >= 3 / 4 - 0.1 and aspect.max() <= 4 / 3 + 0.1
    # torchvision's own sampler, for the same image size: the same area distribution
    ref = [
        v2.RandomResizedCrop.get_params(torch.zeros(1, 28, 28), list(scale), [3 / 4, 4 / 3])
        for _ in range(2000)
    ]
    ref_area = torch.tensor([h * w / 28**2 for _, _, h, w in ref])
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(area.std() - ref_area.std()) < 0.02
    # and the pictures: per-pixel mean and spread of many crops of one image agree with the per-sample path
    x = fmnist_batch(1).repeat(400, 1, 1, 1)
    batched = t(x, batch_generator(0, 0, 0))
    assert batched.shape == (400, 3, 32, 32) and batched.dtype == torch.float32
    assert not torch.equal(batched[0], batched[1])  # each sample its own crop
    torch.manual_seed(0)
    per = train_transform(
        {"name": "basic", "scale": list(scale), "hflip": 0.0}, 32, MEAN, STD, "bilinear", 1.0
    )
    reference = torch.stack([per(img) for img in x])
    assert abs(batched.mean() - reference.mean()) < 0.05 and abs(batched.std() - reference.std()) < 0.05
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (batched >= lo.view(1, 3, 1, 1) - 1e-5).all() and (batched <= hi.view(1, 3, 1, 1) + 1e-5).all()


def weights(run_dir):
    from visiontune.training.checkpoints import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def test_a_run_on_device_transforms_equals_the_per_sample_run(tmp_path, caplog):
    import logging

    from visiontune.train import train

    with caplog.at_level(logging.INFO, logger="visiontune"):
        train(compose_cfg([*FAST, "logger=csv", "data.device_transforms=true"], tmp_path / "device"))
    assert "on the device" in caplog.text
    train(compose_cfg([*FAST, "logger=csv", "data.device_transforms=false"], tmp_path / "loader"))
    a, b = weights(tmp_path / "device"), weights(tmp_path / "loader")
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_device_transforms_true_where_they_do_not_apply_is_refused(tmp_path):
    from visiontune.errors import UserError
    from visiontune.train import train

    cfg = compose_cfg([*FAST, "augment=randaugment", "data.device_transforms=true"], tmp_path)
    with pytest.raises(UserError, match="augment=randaugment has no batched equivalent"):
        train(cfg)


def test_random_crop_run_trains_on_the_device_path(tmp_path, caplog):
    import logging

    from visiontune.train import train

    with caplog.at_level(logging.INFO, logger="visiontune"):
        train(compose_cfg([*FAST, "logger=csv", "augment=basic"], tmp_path / "basic"))
    assert "on the device" in caplog.text
    assert all(torch.isfinite(v.float()).all() for v in weights(tmp_path / "basic").values())
