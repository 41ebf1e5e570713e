"""Test-time adaptation: a copy of the model adapts to the batches it is asked to classify.

`adapt=bn|tent` in eval and predict (and, under eval robustness=true, per corruption and severity).
The checkpoint's model is never touched: the `Adapter` holds a deep copy, and the inference session
sends its batches through that copy (`InferenceSession.logits`), so probabilities still come from the
session's one formula.

- **bn** (AdaBN, Li et al. 2016): every BatchNorm layer re-estimates its running mean and variance on
  the incoming batches, and the batch is then classified with them (eval mode). The estimate is the
  mean of the batch statistics weighted by their image counts, cumulative over the stream (the split,
  or the files predict is given), starting from nothing: the first batch alone, then the first two,
  and so on. So it is deterministic for a given order and batch size, a short final batch counts for
  its images only, and no source statistic is kept. Affine parameters stay as trained.
- **tent** (Wang et al., ICLR 2021): the norm layers' affine parameters (BatchNorm, LayerNorm and
  GroupNorm gamma and beta) are trained online to minimise the entropy of the model's predictions,
  `steps` gradient steps per batch with Adam (the paper's CIFAR default) or SGD with momentum 0.9.
  BatchNorm normalises with the statistics of the batch itself, as in the paper (its running
  statistics stay as they are, unused); dropout stays off. As in the paper's code, a batch's
  prediction is the forward pass before its last step. `reset=batch` restores the trained parameters
  and the optimizer before every batch (episodic); `reset=never` keeps adapting along the stream.

Both assume that each batch is a fair sample of the data, and a test split is often sorted by class
(an image folder is): on the digits test folder in class order, bn fell from 97.0% to 82.5% and tent
to 28.6%. So by default (`adapt.shuffle=true`) the adapter sees the items in a seeded random order,
the same for every run, and the results are put back in the items' order; `adapt.shuffle=false`
keeps the order given (a stream that is already mixed, or a deployment that must adapt in arrival
order). The statistics of one image say little about a domain, so a batch size of 1 is refused, and
so is a method the model has no layers for.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from visiontune.errors import UserError

log = logging.getLogger("visiontune")
METHODS = ("none", "bn", "tent")
RESETS = ("never", "batch")
OPTIMIZERS = ("adam", "sgd")
NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class AdaptSettings:
    """The `adapt` config group: method, and for tent its LR, steps per batch, reset and optimizer."""

    method: str = "none"
    lr: float = 1e-3
    steps: int = 1
    reset: str = "never"
    optimizer: str = "adam"
    shuffle: bool = True

    @classmethod
    def from_config(cls, node) -> AdaptSettings:
        """From the composed `adapt` node (absent or null = none)."""
        if node is None:
            return cls()
        values = {k: node[k] for k in ("method", "lr", "steps", "reset", "optimizer", "shuffle") if k in node}
        return cls(**values)


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The norm layers with affine parameters: what tent trains."""
    return [m for m in model.modules() if isinstance(m, NORMS) and getattr(m, "weight", None) is not None]


def entropy(logits: torch.Tensor, heads) -> torch.Tensor:
    """Mean prediction entropy over the batch: softmax entropy per multiclass head, binary entropy
    per label of a multilabel head (summed over the heads)."""
    total = logits.new_zeros(())
    for h in heads:
        z = logits if len(heads) == 1 else logits[:, h.start : h.stop]
        if h.kind == "multiclass":
            total = total - (z.softmax(1) * z.log_softmax(1)).sum(1).mean()
        else:
            p = z.sigmoid()
            total = total - (p * nn.functional.logsigmoid(z) + (1 - p) * nn.functional.logsigmoid(-z)).mean()
    return total


class Adapter:
    """A deep copy of `model` that adapts to each batch it classifies (`__call__`: images -> logits).

    `reset()` restores the copy's trained state (and the BatchNorm estimate starts again): call it
    where a new stream begins, e.g. a new split or a new corruption."""

    def __init__(self, model: nn.Module, settings: AdaptSettings, heads, batch_size: int | None = None):
        check(model, settings, batch_size)
        self.settings, self.heads, self.method = settings, list(heads), settings.method
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.norms = batch_norms(self.model) if self.method == "bn" else norm_layers(self.model)
        self.params = [p for m in self.norms for p in (m.weight, m.bias) if p is not None]
        if self.method == "tent":
            for p in self.params:
                p.requires_grad_(True)
            for m in self.norms:
                if isinstance(m, _BatchNorm):  # batch statistics, running buffers left as they are
                    m.track_running_stats = False
        self.trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.seen = 0
        self.optimizer = self._optimizer()

    def _optimizer(self):
        if self.method != "tent":
            return None
        if self.settings.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=self.settings.lr, momentum=0.9)
        return torch.optim.Adam(self.params, lr=self.settings.lr, betas=(0.9, 0.999))

    def order(self, n: int) -> torch.Tensor:
        """The order in which the adapter sees `n` items: a permutation seeded by n alone with
        adapt.shuffle=true, else 0..n-1. The callers put their results back in the items' order."""
        if not self.settings.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(SHUFFLE_SEED))

    def reset(self) -> None:
        """The trained parameters and buffers back, a fresh optimizer, and no images seen."""
        self.model.load_state_dict(self.trained)
        self.seen = 0
        self.optimizer = self._optimizer()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.method == "bn":
            return self._bn(images)
        if self.settings.reset == "batch":
            self.reset()
        return self._tent(images)

    @torch.no_grad()
    def _bn(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        for m in self.norms:  # the image-weighted mean of the batch statistics so far
            m.train()
            m.momentum = n / (self.seen + n)
        self.model(images)
        self.seen += n
        for m in self.norms:
            m.eval()
        return self.model(images)

    def _tent(self, images: torch.Tensor) -> torch.Tensor:
        for m in self.norms:
            m.train()
        with torch.enable_grad():
            for _ in range(self.settings.steps):
                logits = self.model(images)
                entropy(logits.float(), self.heads).backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        for m in self.norms:
            m.eval()
        return logits.detach()


def check(model: nn.Module, settings: AdaptSettings, batch_size: int | None) -> None:
    """One line for what cannot adapt: an unknown method, reset or optimizer, a model without the
    layers the method adapts, a batch of one image."""
    method = settings.method
    if method not in METHODS:
        raise UserError(f"adapt={method} is unknown; choose one of {', '.join(METHODS)}")
    if settings.reset not in RESETS:
        raise UserError(f"adapt.reset={settings.reset} is unknown; choose one of {', '.join(RESETS)}")
    if settings.optimizer not in OPTIMIZERS:
        raise UserError(
            f"adapt.optimizer={settings.optimizer} is unknown; choose one of {', '.join(OPTIMIZERS)}"
        )
    if not (isinstance(settings.steps, int) and settings.steps >= 1) or not float(settings.lr) > 0:
        raise UserError(f"adapt.steps={settings.steps} and adapt.lr={settings.lr} must be >= 1 and > 0")
    if method == "bn" and not batch_norms(model):
        raise UserError(
            "adapt=bn re-estimates BatchNorm statistics, and this model has no BatchNorm layer. "
            "Fix: adapt=tent (its norm layers) or adapt=none"
        )
    if method == "tent" and not norm_layers(model):
        raise UserError(
            "adapt=tent trains norm layers' affine parameters, and this model has none. Fix: adapt=none"
        )
    if method != "none" and batch_size is not None and batch_size < 2:
        raise UserError(
            f"adapt={method} with a batch size of {batch_size}: it adapts to each batch's statistics, and "
            "one image's are meaningless. Fix: a batch size of 64 or more (data.batch_size=, predict's batch_size=)"
        )


def make_adapter(model: nn.Module, settings: AdaptSettings, heads, batch_size: int | None) -> Adapter | None:
    """An Adapter for `settings`, or None for adapt=none (after the checks)."""
    check(model, settings, batch_size)
    if settings.method == "none":
        return None
    extra = "" if settings.method == "bn" else (
        f" (lr {settings.lr}, {settings.steps} step(s) per batch, reset={settings.reset}, {settings.optimizer})"
    )  # fmt: skip
    log.info("test-time adaptation: %s on a copy of the model%s", settings.method, extra)
    return Adapter(model, settings, heads, batch_size)
