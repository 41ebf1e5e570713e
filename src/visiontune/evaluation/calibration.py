"""Metrics from logits, the reliability diagram's bins and temperature scaling: pure tensor math.

Everything here takes the logits of a whole split (N, C) and the integer targets (N,), so eval,
predict and the tests compute the same numbers from the same inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_f1_score,
)

from visiontune.models.heads import tempered_softmax  # softmax(logits / T), float32

ECE_BINS = 15


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, prefix: str = "test/"
) -> dict[str, float]:
    """acc, loss, top5 (at least 5 classes), macro_f1, nll and 15-bin ECE of one split.

    `acc` and `loss` use the raw logits, exactly as the module's test_step does (so they equal what
    training logged); `nll` and `ece` use the probabilities at `temperature` (1.0 unless calibrated).
    """
    logits, targets = logits.float(), targets.long()
    num_classes = logits.shape[1]
    probs = tempered_softmax(logits, temperature)
    metrics = {
        "acc": multiclass_accuracy(logits, targets, num_classes, average="micro"),
        "loss": F.cross_entropy(logits, targets),
        "macro_f1": multiclass_f1_score(logits, targets, num_classes, average="macro"),
        "nll": F.cross_entropy(logits / float(temperature), targets),
        "ece": multiclass_calibration_error(probs, targets, num_classes, n_bins=ECE_BINS, norm="l1"),
    }
    if num_classes >= 5:
        metrics["top5"] = multiclass_accuracy(logits, targets, num_classes, average="micro", top_k=5)
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin [k/n, (k+1)/n): mean confidence, accuracy and count of the top-1 predictions.

    A confidence of exactly 1.0 counts in the last bin. Empty bins have count 0 (and 0 for the means).
    """
    confidence, predicted = probs.float().max(1)
    correct = (predicted == targets).float()
    index = (confidence * n_bins).long().clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).float()
    conf_sum = torch.zeros(n_bins).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {
        "lower": [k / n_bins for k in range(n_bins)],
        "confidence": (conf_sum / safe).tolist(),
        "accuracy": (acc_sum / safe).tolist(),
        "count": count.long().tolist(),
    }


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The one temperature T > 0 that minimises the NLL of softmax(logits / T) (LBFGS on log T).

    Optimising log T keeps T positive without constraints; the argmax (accuracy) does not change.
    """
    logits, targets = logits.detach().float().clone(), targets.long().clone()  # clone: no inference tensors
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.float() / float(temperature), targets.long()))


def ece(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    probs = tempered_softmax(logits, temperature)
    return float(multiclass_calibration_error(probs, targets.long(), probs.shape[1], n_bins=ECE_BINS))
