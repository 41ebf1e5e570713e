"""Tasks: what the model predicts per image, and how it learns and is scored.

Every model has one objective (`make_objective`), built from its full task (`heads.resolve_task`), and
the module's steps delegate to it; its `heads` say where each head's logits are.
- `multiclass` (the default): one head, one label per image, softmax and cross-entropy
  (`Classification`). MixUp/CutMix, the AugMix JSD term, class weights, label smoothing and
  distillation belong to it; its metrics are logged per batch (train/acc, val/acc, test/acc, ...).
- `multilabel`: a set of labels per image, one sigmoid per label, BCEWithLogits (optional `pos_weight`),
  scored by mean average precision (macro over the labels that have positives, and micro), F1 at the
  decision thresholds, and per-label AP. `threshold=auto` tunes one threshold per label on the
  validation split at every validation epoch end; they live in the head, so the checkpoint carries them.
- `multitask`: several heads on the shared backbone features, each `multiclass` or `multilabel`, with
  their losses summed (fixed weights, or the learned homoscedastic weights of Kendall et al., 2018).
  A missing label (-1) drops out of its head's loss and metrics only.
Multilabel and multitask (`HeadsObjective`) are scored over the whole split at the epoch's end.

The model's output is one logit vector: the heads' logits side by side (`Head.start:Head.stop`), so
export and serve move a single tensor; `heads.head_probabilities` turns it into each head's probabilities.
Targets of multilabel and multitask are dicts {head name: tensor}: class indices (N,) for a multiclass
head, 0/1 floats (N, C) for a multilabel one, -1 where the label is missing; multiclass targets are
class indices (N,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torchmetrics.functional.classification import binary_average_precision, multiclass_accuracy

from visiontune.models.heads import DEFAULT_THRESHOLD, MISSING, Head, task_heads
from visiontune.training.losses import distillation_loss, jsd_consistency


# -- losses and metrics: pure tensor functions
def masked_bce(
    logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """BCEWithLogits averaged over the known entries (target != -1); 0 (still in the graph) when none are."""
    known = target != MISSING
    loss = F.binary_cross_entropy_with_logits(
        logits, target.clamp_min(0).to(logits.dtype), pos_weight=pos_weight, reduction="none"
    )
    return (loss * known).sum() / known.sum().clamp_min(1)


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy averaged over the images with a label (target != -1); 0 (in the graph) when none has."""
    known = target != MISSING
    loss = F.cross_entropy(logits, target.clamp_min(0), label_smoothing=label_smoothing, reduction="none")
    return (loss * known).sum() / known.sum().clamp_min(1)


def head_losses(logits: torch.Tensor, targets: dict, heads: list[Head], label_smoothing: float = 0.0) -> dict:
    """{head name: its loss} over the images that have that head's label."""
    losses = {}
    for h in heads:
        z, t = logits[:, h.start : h.stop], targets[h.name]
        if h.kind == "multiclass":
            losses[h.name] = masked_cross_entropy(z, t.long(), label_smoothing)
        else:
            pw = torch.tensor(h.pos_weight, device=z.device, dtype=z.dtype) if h.pos_weight else None
            losses[h.name] = masked_bce(z, t, pw)
    return losses


def combine_losses(losses: dict, heads: list[Head], log_vars: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i L_i with the fixed weights, or with learned s_i = log sigma_i^2 (Kendall et al., 2018):
    sum_i exp(-s_i) L_i + s_i / 2 (the fixed weights are then not used)."""
    if log_vars is None:
        return sum(h.weight * losses[h.name] for h in heads)
    # a head with no label in the batch (its masked loss is exactly 0, no graph through the data) adds
    # nothing: its s_i / 2 alone would keep pushing that head's weight up
    return sum(
        torch.exp(-s) * losses[h.name] + (s / 2 if losses[h.name].detach().ne(0) else 0 * s)
        for h, s in zip(heads, log_vars, strict=True)
    )


def _ap(scores: torch.Tensor, target: torch.Tensor) -> float:
    """torchmetrics' average precision of one ranking; NaN without a positive."""
    if not bool((target == 1).any()):
        return math.nan
    return float(binary_average_precision(scores.float(), target.long()))


def average_precisions(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """AP of each label over its known entries (NaN for a label without a positive there)."""
    known = target != MISSING
    return torch.tensor([_ap(probs[known[:, j], j], target[known[:, j], j]) for j in range(probs.shape[1])])


def multilabel_scores(probs: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor) -> dict:
    """map (macro over the labels that have positives), map_micro (one ranking of every known entry),
    f1 (macro over the labels, at the thresholds; 0 for a label never predicted nor present), per-label AP."""
    ap = average_precisions(probs, target)
    with_positives = ap[~ap.isnan()]
    known = target != MISSING
    decided, truth = (probs >= thresholds.to(probs.device)) & known, (target == 1) & known
    tp = (decided & truth).sum(0).double()
    fp, fn = (decided & ~truth).sum(0).double(), (~decided & truth).sum(0).double()
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
    return {
        "map": float(with_positives.mean()) if len(with_positives) else math.nan,
        "map_micro": _ap(probs[known], target[known]),
        "f1": float(f1.mean()),
        "ap": ap.tolist(),
    }


def head_scores(logits: torch.Tensor, targets: dict, heads: list[Head], thresholds: torch.Tensor,
                stage: str, per_label: bool = False) -> dict[str, float]:  # fmt: skip
    """The metrics of a whole split, per head, under their logged names; `<stage>/score` is the mean of
    the heads' scores (acc or map) for multitask. Computed on the full split, so eval equals test_step."""
    out, scores = {}, []
    losses = head_losses(logits.float(), targets, heads)
    for h in heads:
        z, t = logits[:, h.start : h.stop].float(), targets[h.name]
        out[h.metric(stage, "loss")] = float(losses[h.name])
        if h.kind == "multiclass":
            t = t.long()
            known = t != MISSING
            acc = (
                multiclass_accuracy(z[known], t[known], len(h.classes), average="micro")
                if known.any()
                else math.nan
            )
            out[h.metric(stage, "acc")] = float(acc)
        else:
            s = multilabel_scores(z.sigmoid(), t, thresholds[h.start : h.stop])
            out.update({h.metric(stage, k): s[k] for k in ("map", "map_micro", "f1")})
            if per_label:
                pairs = zip(h.classes, s["ap"], strict=True)  # a label without positives has no AP
                out.update({h.metric(stage, f"ap/{c}"): a for c, a in pairs if not math.isnan(a)})
        scores.append(out[h.metric(stage, h.score_name())])
    if len(heads) > 1 or heads[0].prefix:
        out[f"{stage}/loss"] = float(sum(h.weight * losses[h.name] for h in heads))
        out[f"{stage}/score"] = float(torch.tensor(scores).nanmean())
    return out


def tune_thresholds(
    probs: torch.Tensor, target: torch.Tensor, default: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """Per label, the threshold that maximises F1 on (probs, target): midway between the lowest
    probability predicted positive and the next one down. A label without positives keeps `default`."""
    thresholds = torch.full((probs.shape[1],), float(default))
    for j in range(probs.shape[1]):
        known = target[:, j] != MISSING
        p, t = probs[known, j].double(), (target[known, j] == 1).double()
        positives = t.sum()
        if positives == 0:
            continue
        order = torch.argsort(p, descending=True, stable=True)
        p, t = p[order], t[order]
        f1 = 2 * t.cumsum(0) / (torch.arange(1, len(p) + 1, dtype=torch.float64) + positives)
        distinct = torch.ones_like(p, dtype=torch.bool)  # cut only between distinct probabilities
        distinct[:-1] = p[:-1] > p[1:]
        k = int(torch.where(distinct, f1, torch.full_like(f1, -1.0)).argmax())
        below = float(p[k + 1]) if k + 1 < len(p) else 0.0
        thresholds[j] = (float(p[k]) + below) / 2
    return thresholds


def tuned_thresholds(
    logits: torch.Tensor, targets: dict, heads: list[Head], current: torch.Tensor
) -> torch.Tensor:
    """`current` with each multilabel head's slice replaced by thresholds tuned for F1."""
    out = current.detach().clone().cpu()
    for h in heads:
        if h.kind == "multilabel":
            out[h.start : h.stop] = tune_thresholds(
                logits[:, h.start : h.stop].float().sigmoid().cpu(), targets[h.name].cpu()
            )
    return out


# -- the split's outputs, gathered over the epoch (and over DDP ranks)
class SplitOutputs(torchmetrics.Metric):
    """The logits and targets of one split's epoch, concatenated (and gathered across processes)."""

    full_state_update = False

    def __init__(self, heads: list[Head]):
        super().__init__()
        self.head_names = [h.name for h in heads]
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        for i, _ in enumerate(heads):
            self.add_state(f"target_{i}", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: dict) -> None:
        self.logits.append(logits.detach().float())
        for i, name in enumerate(self.head_names):
            getattr(self, f"target_{i}").append(targets[name].detach())

    def compute(self):
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        return cat(self.logits), {n: cat(getattr(self, f"target_{i}")) for i, n in enumerate(self.head_names)}


class Classification(nn.Module):
    """The objective of a multiclass model: one head, cross-entropy, accuracy logged per batch.

    The loss is the module's `loss` (class weights, label smoothing), after the module's batch `mix`
    (MixUp/CutMix), plus `jsd_weight` times the AugMix consistency term when the batch holds views,
    and distilled from the module's `teacher` when it has one: the module keeps those settings.
    """

    def __init__(self, heads: list[Head]):
        super().__init__()
        self.heads = heads
        num_classes = len(heads[0].classes)
        metric = lambda: torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = metric(), metric(), metric()

    def training_loss(self, module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # augment.jsd: (batch, views, C, H, W), view 0 clean (cached Activations never hold views)
        views = x.shape[1] if isinstance(x, torch.Tensor) and x.ndim == 5 else 0
        if views:
            x = x.flatten(0, 1)
        target = y
        if module.mix is not None:
            x, target = module.mix(x, y)
        logits = module(x)
        if views:
            per_view = logits.view(-1, views, logits.shape[-1])
            logits = per_view[:, 0]
            loss = module.loss(logits, target) + module.jsd_weight * jsd_consistency(per_view)
        else:
            loss = module.loss(logits, target)
        if module.teacher is not None:  # the teacher sees what the student's logits came from
            seen = x.view(-1, views, *x.shape[1:])[:, 0] if views else x
            loss = distillation_loss(logits, module.teacher(seen), loss, **module.distill)
        hard = target.argmax(1) if target.ndim == 2 else target
        self.train_acc.update(logits, hard)  # logged per epoch only: no per-batch value to compute
        module.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        module.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def eval_step(self, module, logits: torch.Tensor, y: torch.Tensor, stage: str) -> None:
        metric = self.val_acc if stage == "val" else self.test_acc
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        module.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, prog_bar=stage == "val")
        module.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=stage == "val")

    def epoch_end(self, module, stage: str) -> None:
        """Nothing to do: Lightning reduces the per-batch values."""


class HeadsObjective(nn.Module):
    """Loss and metrics of a multilabel or multitask model: per-head losses over the known labels,
    scored over the whole split at the epoch's end.

    It owns no parameters (those are in `MultiHead`), only the per-stage output stores, so the
    checkpoint's weights are the model's alone.
    """

    def __init__(self, task: dict, label_smoothing: float = 0.0):
        super().__init__()
        self.task = task
        self.heads = task_heads(task)
        self.label_smoothing = label_smoothing
        self.auto_threshold = task.get("threshold") == "auto"
        self.outputs = nn.ModuleDict({s: SplitOutputs(self.heads) for s in ("val", "test")})

    def training_loss(self, module, x: torch.Tensor, targets: dict) -> torch.Tensor:
        logits = module(x)
        losses = head_losses(logits, targets, self.heads, self.label_smoothing)
        loss = combine_losses(losses, self.heads, module.head.log_vars)
        module.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if len(self.heads) > 1:
            for h in self.heads:
                module.log(h.metric("train", "loss"), losses[h.name], on_step=False, on_epoch=True)
        return loss

    def eval_step(self, module, logits: torch.Tensor, targets: dict, stage: str) -> None:
        self.outputs[stage].update(logits, targets)

    def epoch_end(self, module, stage: str) -> None:
        """Log the split's metrics; on val with threshold=auto, first tune the thresholds on it."""
        store = self.outputs[stage]
        if not store.update_count:
            return
        logits, targets = store.compute()
        store.reset()
        if stage == "val" and self.auto_threshold and not module.trainer.sanity_checking:
            module.head.thresholds.copy_(
                tuned_thresholds(logits, targets, self.heads, module.head.thresholds)
            )
        values = head_scores(
            logits, targets, self.heads, module.head.thresholds, stage, per_label=stage == "test"
        )
        shown = {f"val/{name}" for name in ("score", "map", "acc", "loss")}
        for name, value in values.items():
            module.log(name, value, prog_bar=name in shown)


def make_objective(task: dict, label_smoothing: float = 0.0) -> nn.Module:
    """The objective of a resolved task (`heads.resolve_task`)."""
    if task["name"] == "multiclass":
        return Classification(task_heads(task))
    return HeadsObjective(task, label_smoothing)
