"""Common image corruptions after ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich, 2019), severities 1..5.

Each corruption takes an image (C, H, W) or a batch (N, C, H, W), uint8 or float in [0, 1], BEFORE
normalisation, and returns the same dtype and range. The random ones draw from the torch.Generator
they are given (never from the global RNG), so an image corrupts the same way for the same seed.
`corrupt_indexed` gives each image its own generator, seeded from (seed, corruption, severity,
dataset index): a result does not depend on the batch size or on which images share a batch.

Severity parameters (SEVERITY): the CIFAR-10-C table, which the authors scaled from ImageNet-C for
32 px images; the blurs' and pixelate's pixel sizes are for a 32 px image and scale with the image's
shorter side, so a 64 px input (often an upsampled 28 px one) loses as much detail as a 32 px one. rotate is ours (MNIST-C rotates at one
level only). brightness follows ImageNet-C (the HSV value is raised by c, so a black background turns
grey); torchvision's adjust_brightness multiplies instead and would leave black pixels black.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# Each corruption's parameter at severities 1..5 (see the module docstring for the sources).
SEVERITY = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std, in [0, 1] pixel units
    "shot_noise": (500, 250, 100, 75, 50),  # photons at full intensity: Poisson(x * c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of values set to 0 or 1 (salt and pepper)
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma, px of a 32 px image
    "motion_blur": (
        1.0,
        1.5,
        2.0,
        2.5,
        3.0,
    ),  # sigma of a one-sided trail, px of a 32 px image; angle ~ U(-45, 45)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor (1 = unchanged)
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side factor at 32 px: down (antialiased), back up nearest
    "rotate": (8, 16, 24, 32, 40),  # degrees, the sign drawn at random; corners filled black
}
CORRUPTIONS = tuple(SEVERITY)
SEVERITIES = (1, 2, 3, 4, 5)
RANDOM = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "rotate"})
REFERENCE_SIDE = 32  # the image side for which the blurs and pixelate are given in pixels


Generators = torch.Generator | Sequence[torch.Generator]


def corrupt(
    images: torch.Tensor, name: str, severity: int, generator: Generators | None = None
) -> torch.Tensor:
    """`images` (C, H, W) or (N, C, H, W), uint8 or float in [0, 1], under corruption `name` at `severity`.

    `generator`: one torch.Generator that the whole batch draws from in order (None = one seeded 0), or
    one generator per image, so that each image's corruption depends on its own generator only.
    """
    if name not in SEVERITY:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r}: must be one of {SEVERITIES}")
    if images.ndim not in (3, 4):
        raise ValueError(f"images of shape {tuple(images.shape)}: need (C, H, W) or (N, C, H, W)")
    single = images.ndim == 3
    batch = images.unsqueeze(0) if single else images
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator) and len(generator) != len(batch):
        raise ValueError(f"{len(generator)} generators for {len(batch)} images: give one, or one per image")
    c = SEVERITY[name][severity - 1]
    if name == "jpeg":  # JPEG works on uint8: a float image goes through uint8 and back
        out = TF.jpeg(to_uint8(batch), quality=int(c))
        out = out if batch.dtype == torch.uint8 else TF.to_dtype(out, batch.dtype, scale=True)
    else:
        out = from_float(OPS[name](to_float(batch), c, generator), batch.dtype)
    return out[0] if single else out


def corrupt_indexed(images: torch.Tensor, indices, name: str, severity: int, seed: int) -> torch.Tensor:
    """A batch (N, C, H, W) corrupted image by image, each with its own generator from
    (seed, name, severity, its dataset index): the same image gets the same corruption in any batch."""
    if name not in RANDOM:
        return corrupt(images, name, severity)
    return corrupt(images, name, severity, [generator_for(seed, name, severity, int(i)) for i in indices])


def generator_for(seed: int, name: str, severity: int, index: int) -> torch.Generator:
    """A CPU generator seeded by a stable hash of its arguments (Python's hash() changes per process)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{severity}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# -- dtype: every op below works on float32 in [0, 1]
def to_float(images: torch.Tensor) -> torch.Tensor:
    return TF.to_dtype(images, torch.float32, scale=True) if images.dtype == torch.uint8 else images.float()


def from_float(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    images = images.clamp(0, 1)
    if dtype == torch.uint8:
        return images.mul(255).round().to(torch.uint8)
    return images.to(dtype)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images if images.dtype == torch.uint8 else from_float(images.float(), torch.uint8)


def side_scale(images: torch.Tensor) -> float:
    return min(images.shape[-2:]) / REFERENCE_SIDE


def draw(gen: Generators, x: torch.Tensor, fn) -> torch.Tensor:
    """`fn(generator, images)` -> random numbers with one leading row per image, drawn on the CPU from
    the one generator, or image by image from each image's own; on `x`'s device."""
    if isinstance(gen, torch.Generator):
        return fn(gen, x.cpu()).to(x.device)
    return torch.cat([fn(g, x[i : i + 1].cpu()) for i, g in enumerate(gen)]).to(x.device)


# -- the corruptions: (float batch in [0, 1], parameter, generator(s)) -> float batch (clamped afterwards)
def gaussian_noise(x, c, gen):
    return x + c * draw(gen, x, lambda g, part: torch.randn(part.shape, generator=g))


def shot_noise(x, c, gen):
    return draw(gen, x, lambda g, part: torch.poisson(part * c, generator=g)) / c


def impulse_noise(x, c, gen):
    u = draw(gen, x, lambda g, part: torch.rand(part.shape, generator=g))
    return torch.where(u < c / 2, 0.0, torch.where(u < c, 1.0, x))


def gaussian_blur(x, c, gen):
    sigma = c * side_scale(x)
    radius = max(1, math.ceil(3 * sigma))
    return TF.gaussian_blur(x, [2 * radius + 1] * 2, [sigma, sigma])


def motion_blur(x, c, gen):
    """A one-sided Gaussian trail (ImageNet-C's Wand motion blur) at a random angle per image."""
    sigma = c * side_scale(x)
    angles = (draw(gen, x, lambda g, part: torch.rand(len(part), generator=g)) * 90 - 45).tolist()
    kernels = torch.stack([trail_kernel(sigma, a) for a in angles]).to(x)  # (N, k, k)
    n, ch, h, w = x.shape
    k = kernels.shape[-1]
    weight = kernels.repeat_interleave(ch, 0).unsqueeze(1)  # one kernel per image and channel
    padded = F.pad(x.reshape(1, n * ch, h, w), [k // 2] * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=n * ch).reshape(n, ch, h, w)


def trail_kernel(sigma: float, angle_deg: float) -> torch.Tensor:
    """(k, k) weights along a ray from the centre at `angle_deg`, falling off as a Gaussian of `sigma`
    px; points between pixels are split bilinearly. Sums to 1."""
    length = 3 * sigma
    radius = max(1, math.ceil(length))
    k = 2 * radius + 1
    t = torch.linspace(0, length, max(2, 8 * radius), dtype=torch.float64)
    weights = torch.exp(-(t**2) / (2 * sigma**2))
    theta = math.radians(angle_deg)
    xs, ys = radius + t * math.cos(theta), radius - t * math.sin(theta)
    kernel = torch.zeros(k, k, dtype=torch.float64)
    x0, y0 = xs.floor().long(), ys.floor().long()
    fx, fy = xs - x0, ys - y0
    for dx, dy, share in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xi, yi = (x0 + dx).clamp(0, k - 1), (y0 + dy).clamp(0, k - 1)
        kernel.index_put_((yi, xi), weights * share, accumulate=True)
    return (kernel / kernel.sum()).float()


def contrast(x, c, gen):
    return TF.adjust_contrast(x, c)


def brightness(x, c, gen):
    """Raise the HSV value (the channel maximum) by c at constant hue and saturation; for a grey image
    that is x + c."""
    value = x.amax(dim=-3, keepdim=True)
    raised = (value + c).clamp(max=1.0)
    scale = torch.where(value > 0, raised / value.clamp_min(1e-12), torch.zeros_like(value))
    return torch.where(value > 0, x * scale, raised.expand_as(x))


def pixelate(x, c, gen):
    """Down to c times the side of a 32 px image (blocks of 1/c of its pixels), then back up."""
    h, w = x.shape[-2:]
    factor = min(1.0, c / side_scale(x))
    small = TF.resize(x, [max(1, round(h * factor)), max(1, round(w * factor))], antialias=True)
    return TF.resize(small, [h, w], interpolation=v2.InterpolationMode.NEAREST)


def rotate(x, c, gen):
    signs = draw(gen, x, lambda g, part: torch.randint(0, 2, (len(part),), generator=g)) * 2 - 1
    return torch.stack(
        [
            TF.rotate(image, float(c * s), interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
            for image, s in zip(x, signs.tolist(), strict=True)
        ]
    )


OPS = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "rotate": rotate,
}
