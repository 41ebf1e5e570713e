"""Learning-rate schedules as pure functions of the optimizer step.

They run through one `LambdaLR` per run, with a per-group gate from the fine-tuning strategy
multiplied in, so a group can sit at LR 0 (soft freeze under DDP) or warm up after it unfreezes
while every scheduler still sees every group from step 0.
"""

from __future__ import annotations

import math

SCHEDULES = ("none", "step", "cosine", "onecycle", "plateau")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: 1/W, 2/W, ... 1 over the first W optimizer steps."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def cosine(progress: float, min_ratio: float = 0.0) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(
    step: int,
    name: str,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
    step_size: int = 7,
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    if name in ("none", "plateau"):  # plateau's reductions are a separate scale (plateau_update)
        return warmup_factor(step, warmup_steps)
    if name == "step":  # StepLR in epochs, e.g. x0.1 every 7 epochs
        return warmup_factor(step, warmup_steps) * gamma ** ((step // steps_per_epoch) // step_size)
    if name == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return warmup_factor(step, warmup_steps) * cosine(progress, min_lr_ratio)
    if name == "onecycle":  # cosine up from lr/div to lr, then cosine down to lr/(div*final_div)
        up = max(1, int(pct_start * total_steps))
        start, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)
        if step < up:
            return start + (1.0 - start) * (1.0 - cosine(step / up))
        return end + (1.0 - end) * cosine((step - up) / max(1, total_steps - up))
    raise ValueError(f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}")


def plateau_update(
    best: float, bad_epochs: int, value: float, patience: int, factor: float, threshold: float = 1e-4
) -> tuple[float, int, float]:
    """ReduceLROnPlateau for a metric to maximise: (new best, epochs without improvement, LR multiplier).

    The multiplier is `factor` once more than `patience` epochs went by without an improvement of at
    least `threshold`, else 1.
    """
    if value > best + threshold:
        return value, 0, 1.0
    bad_epochs += 1
    if bad_epochs > patience:
        return best, 0, factor
    return best, bad_epochs, 1.0
