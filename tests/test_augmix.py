"""augment=augmix: torchvision's AugMix in the train transform, and with augment.jsd=true the three views
per image (clean, AugMix, AugMix) that the Jensen-Shannon consistency loss compares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FAST, compose_cfg
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import v2

from visiontune.build import build_datamodule
from visiontune.config import validate_config
from visiontune.data.transforms import JSD_VIEWS, AugMixViews, eval_transform, train_transform
from visiontune.errors import UserError

ARGS = (32, (0.5,) * 3, (0.25,) * 3, "bilinear", 0.875)  # size, mean, std, interpolation, crop_pct


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def augmix(tmp_path, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_cfg(["augment=augmix", *overrides], tmp_path).augment)


def test_augmix_adds_augmix_to_the_flip_preset(tmp_path, image):
    augment = augmix(tmp_path)
    assert augment["jsd"] is False and augment["all_ops"] is False and augment["jsd_weight"] == 12.0
    transform = train_transform(augment, *ARGS)
    mixers = [t for t in transform.transforms if isinstance(t, v2.AugMix)]
    assert len(mixers) == 1 and mixers[0].all_ops is False  # no brightness/contrast: the eval tests those
    torch.manual_seed(0)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.manual_seed(0)
    assert torch.equal(out, transform(image))
    flip = train_transform({"name": "flip"}, *ARGS)
    differ = []
    for seed in range(4):
        torch.manual_seed(seed)
        a = transform(image)
        torch.manual_seed(seed)
        differ.append(not torch.equal(a, flip(image)))
    assert any(differ), "augment=augmix gives the flip preset's images"


@pytest.mark.parametrize("hflip", [0.0, 0.5])
def test_jsd_views_are_the_clean_view_and_two_augmix_views(tmp_path, image, hflip):
    augment = augmix(tmp_path, "augment.jsd=true", f"augment.hflip={hflip}")
    transform = train_transform(augment, *ARGS)
    assert isinstance(transform, AugMixViews)
    without_augmix = train_transform({"name": "flip", "hflip": hflip}, *ARGS)
    for seed in range(3):
        torch.manual_seed(seed)
        views = transform(image)
        assert views.shape == (JSD_VIEWS, 3, 32, 32) == (3, 3, 32, 32) and views.dtype == torch.float32
        assert type(views) is torch.Tensor
        torch.manual_seed(seed)
        assert torch.equal(views[0], without_augmix(image)), (
            "view 0 must be the train transform without AugMix"
        )
        assert not torch.equal(views[1], views[2]), "the two AugMix views must be drawn independently"
    if hflip == 0.0:  # a deterministic base: the clean view is the eval transform
        assert torch.equal(views[0], eval_transform(*ARGS)(image))


def test_jsd_train_batches_hold_three_views_per_image(tmp_path):
    cfg = compose_cfg([*FAST, "augment=augmix", "augment.jsd=true"], tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (cfg.data.batch_size, JSD_VIEWS, 3, 32, 32) and y.shape == (cfg.data.batch_size,)
    val_x, _ = next(iter(datamodule.val_dataloader()))
    assert val_x.shape == (cfg.data.batch_size, 3, 32, 32)  # eval is untouched


@pytest.mark.parametrize("mix", ["augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0"])
def test_jsd_with_batch_mixing_is_refused_in_one_line(tmp_path, mix):
    cfg = compose_cfg(["augment=augmix", "augment.jsd=true", mix], tmp_path)
    with pytest.raises(UserError) as caught:
        validate_config(cfg)
    message = str(caught.value)
    assert "augment.jsd" in message and mix.split("=")[0] in message and "\n" not in message
    validate_config(compose_cfg(["augment=augmix", "augment.jsd=true"], tmp_path))  # alone it is fine
    validate_config(compose_cfg(["augment=augmix", mix], tmp_path))  # and so is AugMix with a mix


def test_jsd_must_be_a_boolean(tmp_path):
    with pytest.raises(UserError, match="augment.jsd='yes'"):
        validate_config(compose_cfg(["augment=augmix", "augment.jsd=yes"], tmp_path))


def test_a_jsd_run_trains_on_the_three_views(tmp_path):
    """The contract end to end: the DataModule's (B, 3, C, H, W) batches through the module's training step."""
    from visiontune.train import train

    overrides = ["augment=augmix", "augment.jsd=true", "logger=csv", "test=false"]
    overrides += ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]
    score = train(compose_cfg([*FAST, *overrides], tmp_path))
    assert np.isfinite(score)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
