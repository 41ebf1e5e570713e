"""Batched transforms on the device, for the in-memory datasets (`data.device_transforms`).

Fashion-MNIST, MNIST and CIFAR live in memory as uint8. Instead of resizing and normalising one sample
at a time in the loader, whole uint8 batches go to the device and are transformed there with
torchvision v2 functional ops on the batch tensor (resize, centre crop, normalise) and
`torchvision.ops.roi_align` (a random resized crop per sample, in one call). Random parameters are
drawn per sample, from a generator seeded by (seed, epoch, batch), so runs repeat.

The eval transform is the per-sample one exactly (same ops, applied to the batch): tests compare the
two bit for bit. The train presets covered are none, flip, mixup, cutmix (flip; the mix happens in the
training step) and basic (random resized crop + flip): same transform family and parameter ranges as
the per-sample presets, with one difference: the crop is resampled bilinearly without antialiasing
(crops of small images are upsampled, where antialiasing does nothing).
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from visiontune.data.transforms import interpolation_mode

# augment presets with a batched equivalent (others keep the per-sample path)
DEVICE_PRESETS = ("none", "flip", "mixup", "cutmix", "basic")


class BatchTransform:
    """uint8 (N, 1|3, H, W) on any device -> normalised float32 (N, 3, size, size), per-sample randomness."""

    def __init__(self, augment: dict | None, size: int, mean, std, interpolation: str, crop_pct: float):
        augment = augment or {"name": "none"}
        self.name = augment.get("name", "none")
        if self.name not in DEVICE_PRESETS:
            raise ValueError(f"augment={self.name} has no batched device transform")
        self.size, self.crop_pct = int(size), float(crop_pct)
        self.interp = interpolation_mode(interpolation)
        self.hflip = float(augment.get("hflip", 0.5)) if self.name != "none" else 0.0
        self.scale = tuple(augment.get("scale", (0.08, 1.0)))
        self.ratio = (3 / 4, 4 / 3)
        self.mean, self.std = list(mean), list(std)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale -> RGB, as v2.RGB does
        if self.name == "basic":
            x = self.random_resized_crop(x, generator)
        else:
            x = self.resize(x)
        if self.hflip > 0:
            flip = (torch.rand(x.shape[0], generator=generator) < self.hflip).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = TF.to_dtype(x, torch.float32, scale=True)
        return TF.normalize(x, self.mean, self.std)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """The eval geometry: a straight resize at crop_pct 1, else resize then centre crop."""
        if self.crop_pct >= 1.0:
            return TF.resize(x, [self.size, self.size], interpolation=self.interp, antialias=True)
        x = TF.resize(x, math.floor(self.size / self.crop_pct), interpolation=self.interp, antialias=True)
        return TF.center_crop(x, [self.size, self.size])

    def crop_boxes(self, n: int, height: int, width: int, generator=None) -> torch.Tensor:
        """(n, 4) boxes x1, y1, x2, y2: RandomResizedCrop's sampling (area in `scale`, log-uniform aspect
        ratio in `ratio`, 10 tries, then the whole image clipped to the ratio), one per sample."""
        area = height * width
        boxes = torch.empty(n, 4)
        log_ratio = torch.log(torch.tensor(self.ratio))
        for i in range(n):
            for _ in range(10):
                target = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
                aspect = math.exp(torch.empty(1).uniform_(*log_ratio.tolist(), generator=generator).item())
                w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    top = torch.randint(0, height - h + 1, (1,), generator=generator).item()
                    left = torch.randint(0, width - w + 1, (1,), generator=generator).item()
                    break
            else:  # fallback: the central crop at the closest allowed ratio
                in_ratio = width / height
                if in_ratio < self.ratio[0]:
                    w, h = width, round(width / self.ratio[0])
                elif in_ratio > self.ratio[1]:
                    h, w = height, round(height * self.ratio[1])
                else:
                    w, h = width, height
                top, left = (height - h) // 2, (width - w) // 2
            boxes[i] = torch.tensor([left, top, left + w, top + h], dtype=torch.float32)
        return boxes

    def random_resized_crop(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        boxes = self.crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], generator).to(x.device)
        rois = torch.cat([torch.arange(x.shape[0], device=x.device, dtype=torch.float32)[:, None], boxes], 1)
        out = roi_align(
            x.float(), rois, (self.size, self.size), spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
        return out.round_().clamp_(0, 255).to(torch.uint8)


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """A CPU generator for one batch's random parameters, seeded by the run's seed, epoch and batch."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)
