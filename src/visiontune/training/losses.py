"""Losses beyond plain cross-entropy, as pure functions of logits (tested against their formulas)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    ce: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """`alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * ce` (Hinton et al., 2015).

    `ce` is the student's own loss on the labels (cross-entropy, with label smoothing or MixUp targets
    as configured). The T^2 keeps the soft term's gradients on the scale of the hard one.
    """
    t = float(temperature)
    kl = F.kl_div(
        F.log_softmax(student / t, dim=-1),
        F.log_softmax(teacher.detach() / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * kl * t * t + (1.0 - alpha) * ce


def jsd_consistency(logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence among the views of each image (AugMix, Hendrycks et al., 2020).

    `logits` is (batch, views, classes): view 0 the clean image, the others its AugMix views. Each
    view's distribution is compared with their mean: mean_v KL(p_v || m), batch-averaged.
    """
    p = logits.float().softmax(-1)
    log_m = p.mean(1, keepdim=True).clamp(1e-7, 1.0).log()
    return (p * (p.clamp_min(1e-12).log() - log_m)).sum(-1).mean(1).mean(0)
