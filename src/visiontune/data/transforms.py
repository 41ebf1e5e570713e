"""Transform presets (torchvision transforms v2), built from the backbone's pretrained data config.

Eval: resize + centre crop (`crop_pct`), or a plain resize when `crop_pct` is 1 (small source images
such as 28 px Fashion-MNIST must not lose their border). Train with `augment=none` is the eval
transform exactly: a scale mismatch between train and eval costs points (docs/architecture.md).
The eval transform is `eval_geometry` (to a uint8 RGB tensor at the model's size) followed by
`normalise`: the robustness eval corrupts images between the two.

AugMix views (`augment=augmix augment.jsd=true`): the train transform then returns, per image, a
float tensor of shape (JSD_VIEWS, C, H, W) = (3, C, H, W), so a training batch is (B, 3, C, H, W):
- view 0 is the image through the train transform without AugMix (the "clean" view: resize, flip,
  normalisation), the same tensor that augment=flip gives for the same random state;
- views 1 and 2 are two independent AugMix draws from that same resized and flipped image.
The flip is drawn once per image, so the three views differ only by AugMix. The training step
takes cross-entropy on view 0 plus `augment.jsd_weight` times the Jensen-Shannon divergence among
the three views' predictions (Hendrycks et al., 2020). Batch-level MixUp / CutMix cannot be combined
with it (config validation refuses them).
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from visiontune.errors import UserError

# Each preset's tunable keys (conf/augment/<preset>.yaml); every preset also takes the batch-level
# `mixup_alpha` and `cutmix_alpha` (see batch_mix).
PRESET_KEYS = {
    "none": (),
    "flip": ("hflip",),
    "mixup": ("hflip",),  # flip, plus MixUp on each batch (mixup_alpha)
    "cutmix": ("hflip",),  # flip, plus CutMix on each batch (cutmix_alpha)
    "basic": ("scale", "hflip"),
    "affine": ("hflip", "degrees", "translate", "affine_scale"),
    "color": ("hflip", "jitter", "hue", "grayscale_p"),
    "noise": ("hflip", "blur_p", "noise_sigma", "noise_p"),
    "randaugment": ("hflip", "num_ops", "magnitude"),
    "trivialaugment": ("hflip",),
    "autoaugment": ("hflip",),
    "random_erasing": ("hflip", "erasing_p"),
    "strong": ("scale", "hflip", "erasing_p"),
    "augmix": ("hflip", "severity", "mixture_width", "all_ops", "jsd", "jsd_weight"),
}
PRESETS = tuple(PRESET_KEYS)
COMMON_KEYS = ("name", "mixup_alpha", "cutmix_alpha")
JSD_VIEWS = 3  # augment.jsd=true: views per image (clean, AugMix, AugMix); see the module docstring


def interpolation_mode(name: str) -> v2.InterpolationMode:
    return v2.InterpolationMode(name)


def _resize(size: int, crop_pct: float, interp: v2.InterpolationMode) -> list:
    if crop_pct >= 1.0:
        return [v2.Resize((size, size), interpolation=interp, antialias=True)]
    return [
        v2.Resize(math.floor(size / crop_pct), interpolation=interp, antialias=True),
        v2.CenterCrop(size),
    ]


def _to_float(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def eval_geometry(size: int, interpolation: str, crop_pct: float) -> v2.Compose:
    """The eval transform up to normalisation: a PIL image or uint8 tensor to a uint8 RGB (3, size, size)."""
    return v2.Compose([v2.ToImage(), v2.RGB(), *_resize(size, crop_pct, interpolation_mode(interpolation))])


def normalise(mean, std) -> v2.Compose:
    """The end of the eval transform: uint8 (or float in [0, 1]) images, one or a batch, to normalised float."""
    return v2.Compose(_to_float(mean, std))


def eval_transform(size: int, mean, std, interpolation: str, crop_pct: float) -> v2.Compose:
    return v2.Compose([*eval_geometry(size, interpolation, crop_pct).transforms, *_to_float(mean, std)])


def train_transform(augment: dict, size: int, mean, std, interpolation: str, crop_pct: float):
    """The training transform of preset `augment["name"]`; its other keys tune the preset.

    A v2.Compose (image -> (C, H, W)), or with augment=augmix augment.jsd=true an AugMixViews
    (image -> (JSD_VIEWS, C, H, W); see the module docstring).
    """
    name = augment.get("name", "none")
    if name not in PRESET_KEYS:
        raise UserError(f"unknown augment preset '{name}'; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(augment) - set(COMMON_KEYS) - set(PRESET_KEYS[name]))
    if unknown:
        raise UserError(
            f"augment={name} has no keys {unknown}; its keys are {[*COMMON_KEYS, *PRESET_KEYS[name]]}"
        )
    interp = interpolation_mode(interpolation)
    resize = _resize(size, crop_pct, interp)
    flip = [v2.RandomHorizontalFlip(augment.get("hflip", 0.5))]
    rrc = [
        v2.RandomResizedCrop(
            size, scale=tuple(augment.get("scale", (0.08, 1.0))), interpolation=interp, antialias=True
        )
    ]
    after: list = []
    if name == "none":
        middle = resize
    elif name in ("flip", "mixup", "cutmix"):  # the mixes happen on whole batches (batch_mix)
        middle = resize + flip
    elif name == "basic":
        middle = rrc + flip
    elif name == "affine":
        middle = resize + flip
        middle += [
            v2.RandomAffine(
                degrees=augment.get("degrees", 15),
                translate=tuple(augment.get("translate", (0.1, 0.1))),
                scale=tuple(augment.get("affine_scale", (0.9, 1.1))),
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        ]
    elif name == "color":
        jitter = augment.get("jitter", 0.4)
        middle = resize + flip + [v2.ColorJitter(jitter, jitter, jitter, augment.get("hue", 0.1))]
        middle += [v2.RandomGrayscale(augment.get("grayscale_p", 0.1))]
    elif name == "noise":
        middle = (
            resize
            + flip
            + [v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.5))], p=augment.get("blur_p", 0.3))]
        )
        # on a share of the images only: with noise on every image, BatchNorm's running statistics
        # describe noisy images, and clean ones land far off (measured: 38.6% clean test accuracy)
        noise = v2.GaussianNoise(sigma=augment.get("noise_sigma", 0.05), clip=False)
        after = [v2.RandomApply([noise], p=augment.get("noise_p", 0.5))]
    elif name == "randaugment":
        middle = (
            resize
            + flip
            + [v2.RandAugment(num_ops=augment.get("num_ops", 2), magnitude=augment.get("magnitude", 9))]
        )
    elif name == "trivialaugment":
        middle = resize + flip + [v2.TrivialAugmentWide()]
    elif name == "autoaugment":
        middle = resize + flip + [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)]
    elif name == "random_erasing":
        middle = resize + flip
        after = [v2.RandomErasing(p=augment.get("erasing_p", 0.25))]
    elif name == "strong":
        middle = rrc + flip + [v2.TrivialAugmentWide()]
        after = [v2.RandomErasing(p=augment.get("erasing_p", 0.25))]
    elif name == "augmix":
        middle = resize + flip
        augmix = v2.AugMix(
            severity=augment.get("severity", 3),
            mixture_width=augment.get("mixture_width", 3),
            all_ops=augment.get("all_ops", False),
        )
        if augment.get("jsd", False):
            return AugMixViews(v2.Compose([v2.ToImage(), v2.RGB(), *middle]), augmix, normalise(mean, std))
        middle = middle + [augmix]
    else:  # a preset in PRESET_KEYS without a branch here
        raise NotImplementedError(name)
    if name == "noise":  # noise is added in [0, 1] space, before normalisation
        tail = [v2.ToDtype(torch.float32, scale=True), *after, v2.Normalize(mean=list(mean), std=list(std))]
        return v2.Compose([v2.ToImage(), v2.RGB(), *middle, *tail])
    return v2.Compose([v2.ToImage(), v2.RGB(), *middle, *_to_float(mean, std), *after])


class AugMixViews:
    """Image -> (JSD_VIEWS, C, H, W): `base` once (decode, resize, flip), then the clean view and two
    independent `augmix` views of that result, each through `finish` (normalisation)."""

    def __init__(self, base, augmix, finish):
        self.base, self.augmix, self.finish = base, augmix, finish

    def __call__(self, image) -> torch.Tensor:
        x = self.base(image)
        views = [self.finish(x)] + [self.finish(self.augmix(x)) for _ in range(JSD_VIEWS - 1)]
        return torch.stack([v.as_subclass(torch.Tensor) for v in views])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base}, augmix={self.augmix}, finish={self.finish})"


def batch_mix(augment: dict, num_classes: int):
    """Batch-level MixUp / CutMix (soft targets), or None when both alphas are 0."""
    mixup, cutmix = augment.get("mixup_alpha", 0.0), augment.get("cutmix_alpha", 0.0)
    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
