"""Tasks: what the model predicts per image, and how it learns and is scored.

- `multiclass` (the default): one label per image, softmax and cross-entropy. The module keeps its own
  code for it, so its checkpoints and metric names (val/acc, test/acc) are those of every earlier run.
- `multilabel`: a set of labels per image, one sigmoid per label, BCEWithLogits (optional `pos_weight`),
  scored by mean average precision (macro over the labels that have positives, and micro), F1 at the
  decision thresholds, and per-label AP. `threshold=auto` tunes one threshold per label on the
  validation split at every validation epoch end; they live in the head, so the checkpoint carries them.
- `multitask`: several heads on the shared backbone features, each `multiclass` or `multilabel`, with
  their losses summed (fixed weights, or the learned homoscedastic weights of Kendall et al., 2018).
  A missing label (-1) drops out of its head's loss and metrics only.

The model's output is one logit vector: the heads' logits side by side (`Head.start:Head.stop`), so
export and serve move a single tensor; `probabilities` turns it into each head's probabilities.
Targets of these tasks are dicts {head name: tensor}: class indices (N,) for a multiclass head, 0/1
floats (N, C) for a multilabel one, -1 where the label is missing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torchmetrics.functional.classification import binary_average_precision, multiclass_accuracy

TASKS = ("multiclass", "multilabel", "multitask")
HEAD_KINDS = ("multiclass", "multilabel")
WEIGHTINGS = ("fixed", "uncertainty")
MISSING = -1
DEFAULT_THRESHOLD = 0.5
HEAD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def make_head(
    num_features: int, num_classes: int, dropout: float = 0.0, hidden: int | None = None
) -> nn.Sequential:
    """Dropout, an optional hidden layer (ReLU), and the linear layer to `num_classes` logits."""
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    if hidden:
        layers += [nn.Linear(num_features, hidden), nn.ReLU(inplace=True)]
        layers += [nn.Dropout(dropout)] if dropout > 0 else []
        num_features = hidden
    layers.append(nn.Linear(num_features, num_classes))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Head:
    """One head: its outputs are logits[:, start:stop]; `prefix` is `` for the one head of multilabel
    (val/map) and `<name>/` for the heads of multitask (val/<name>/acc)."""

    name: str
    kind: str
    classes: tuple[str, ...]
    start: int
    weight: float = 1.0
    column: str = ""
    prefix: str = ""
    pos_weight: tuple[float, ...] | None = None

    @property
    def stop(self) -> int:
        return self.start + len(self.classes)

    def metric(self, stage: str, name: str) -> str:
        return f"{stage}/{self.prefix}{name}"

    def score_name(self) -> str:
        return "acc" if self.kind == "multiclass" else "map"


def is_multi(task: dict | None) -> bool:
    """True for the tasks this module handles (multilabel, multitask); multiclass is the module's own."""
    return bool(task) and task.get("name", "multiclass") != "multiclass"


def task_heads(task: dict) -> list[Head]:
    """The heads of a resolved task (its `heads` carry their `classes`), in output order."""
    heads, start = [], 0
    multitask = task["name"] == "multitask"
    for h in task["heads"]:
        pos = h.get("pos_weight")
        head = Head(
            name=h["name"], kind=h["kind"], classes=tuple(h["classes"]), start=start,
            weight=float(h.get("weight", 1.0)), column=h.get("column") or h["name"],
            prefix=f"{h['name']}/" if multitask else "", pos_weight=tuple(pos) if pos else None,
        )  # fmt: skip
        heads.append(head)
        start = head.stop
    return heads


def config_heads(task: dict) -> list[dict]:
    """The heads a task config asks for, before the data names their classes: multilabel has one,
    named `labels`, read from the CSV's labels (one `sep`-separated column, or 0/1 columns)."""
    if task["name"] == "multilabel":
        return [{"name": "labels", "column": "labels", "kind": "multilabel", "weight": 1.0}]
    return [dict(h) for h in task.get("heads") or []]


def check_heads(heads, cfg=None) -> str | None:
    """What `task.heads` must be, when it is not (validate.py's rule): a list of {name, column, kind, weight}."""
    if not isinstance(heads, list) or not heads:
        return "a non-empty list of {name, column, kind, weight} (e.g. [{name: digit, column: digit, kind: multiclass, weight: 1.0}])"
    names = []
    for h in heads:
        if not isinstance(h, dict) or not isinstance(h.get("name"), str):
            return "a list of {name, column, kind, weight}, each with a name"
        if not HEAD_NAME.fullmatch(h["name"]):
            return f"heads with names of letters, digits, _ and - (not {h['name']!r})"
        if h.get("kind", "multiclass") not in HEAD_KINDS:
            return f"heads of a known kind: {', '.join(HEAD_KINDS)} (head {h['name']} has kind {h.get('kind')!r})"
        weight = h.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            return f"heads with a weight >= 0 (head {h['name']} has {weight!r})"
        unknown = set(h) - {"name", "column", "kind", "weight"}
        if unknown:
            return f"heads with only the keys name, column, kind, weight (head {h['name']} has {sorted(unknown)})"
        names.append(h["name"])
    if len(set(names)) != len(names):
        return f"heads with distinct names (got {names})"
    return None


# -- the head module
class MultiHead(nn.Module):
    """One head module per task head (in the task's order) on the shared features; their logits side by side.

    It also carries what the task learns or tunes besides the weights, so the checkpoint holds them:
    `thresholds` (one per output; used by multilabel heads) and, with loss_weighting=uncertainty,
    `log_vars` (s_i = log sigma_i^2 of each head, learned with the head's LR, no weight decay).
    """

    def __init__(self, heads: list[Head], num_features: int, dropout: float, hidden: int | None,
                 threshold: float, uncertainty: bool):  # fmt: skip
        super().__init__()
        # a list, not a dict by name: a head may be called `class`, which traced graphs cannot address
        self.heads = nn.ModuleList([make_head(num_features, len(h.classes), dropout, hidden) for h in heads])
        total = sum(len(h.classes) for h in heads)
        self.register_buffer("thresholds", torch.full((total,), float(threshold)))
        self.log_vars = nn.Parameter(torch.zeros(len(heads))) if uncertainty else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features) for head in self.heads], dim=1)


def build_head(task: dict, num_features: int, dropout: float, hidden: int | None) -> MultiHead:
    threshold = task.get("threshold", DEFAULT_THRESHOLD)
    threshold = DEFAULT_THRESHOLD if threshold == "auto" or threshold is None else float(threshold)
    uncertainty = task.get("loss_weighting", "fixed") == "uncertainty"
    return MultiHead(task_heads(task), num_features, dropout, hidden, threshold, uncertainty)


# -- probabilities, losses, metrics: pure tensor functions
def probabilities(logits: torch.Tensor, heads: list[Head], temperature: float = 1.0) -> torch.Tensor:
    """Each head's probabilities side by side: softmax(logits / T) per multiclass head, sigmoid per label."""
    parts = []
    for h in heads:
        z = logits[:, h.start : h.stop].float()
        parts.append((z / float(temperature)).softmax(-1) if h.kind == "multiclass" else z.sigmoid())
    return torch.cat(parts, dim=1)


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


class TaskObjective(nn.Module):
    """Loss and metrics of a multilabel or multitask model; the module's steps delegate here.

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

    def training_loss(self, module, logits: torch.Tensor, targets: dict) -> torch.Tensor:
        losses = head_losses(logits, targets, self.heads, self.label_smoothing)
        loss = combine_losses(losses, self.heads, module.head.log_vars)
        module.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if len(self.heads) > 1:
            for h in self.heads:
                module.log(h.metric("train", "loss"), losses[h.name], on_step=False, on_epoch=True)
        return loss

    def eval_step(self, logits: torch.Tensor, targets: dict, stage: str) -> None:
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


# -- after training: predictions as plain values (predict, serve) and the deployable description
def task_spec(task: dict, thresholds) -> dict:
    """The task as plain JSON (preprocess.json, /health): each head's kind, classes, slice, thresholds."""
    thresholds = [float(t) for t in thresholds]
    return {
        "name": task["name"],
        "heads": [
            {"name": h.name, "kind": h.kind, "classes": list(h.classes), "start": h.start, "stop": h.stop,
             **({"thresholds": thresholds[h.start : h.stop]} if h.kind == "multilabel" else {})}
            for h in task_heads(task)
        ],
    }  # fmt: skip


def spec_heads(spec: dict) -> list[Head]:
    """Heads back from a `task_spec` (a deployment has no checkpoint)."""
    prefix = spec["name"] == "multitask"
    return [Head(h["name"], h["kind"], tuple(h["classes"]), h["start"], prefix=f"{h['name']}/" if prefix else "")
            for h in spec["heads"]]  # fmt: skip


def head_columns(spec: dict, with_target: bool) -> list[str]:
    """predictions.csv's column group of each head (no prefix for the one head of multilabel)."""
    columns = []
    for h in spec_heads(spec):
        names = ["label", "prob"] if h.kind == "multiclass" else ["labels", "probs"]
        names += ["target", "correct"] if with_target else []
        columns += [f"{h.prefix}{n}" for n in names]
    return columns


def decide(probs, spec: dict) -> dict:
    """One image's probabilities (the heads side by side) -> {head: (label, prob)} for a multiclass
    head, {head: [(label, prob), ...]} (above the head's thresholds, most probable first) for a multilabel one."""
    probs = [float(p) for p in probs]
    out = {}
    for h in spec["heads"]:
        p = probs[h["start"] : h["stop"]]
        if h["kind"] == "multiclass":
            best = max(range(len(p)), key=lambda i: p[i])
            out[h["name"]] = (h["classes"][best], p[best])
        else:
            chosen = [i for i, (q, t) in enumerate(zip(p, h["thresholds"], strict=True)) if q >= t]
            chosen.sort(key=lambda i: -p[i])
            out[h["name"]] = [(h["classes"][i], p[i]) for i in chosen]
    return out


def prediction_cells(probs, spec: dict, sep: str = "|") -> dict:
    """The row cells of one image in predictions.csv."""
    cells = {}
    decided = decide(probs, spec)
    for h in spec_heads(spec):
        value = decided[h.name]
        if h.kind == "multiclass":
            cells[f"{h.prefix}label"], cells[f"{h.prefix}prob"] = value[0], f"{value[1]:.6f}"
        else:
            cells[f"{h.prefix}labels"] = sep.join(label for label, _ in value)
            cells[f"{h.prefix}probs"] = sep.join(f"{p:.6f}" for _, p in value)
    return cells


def target_cells(target: dict, spec: dict, predicted: dict | None, sep: str = "|") -> dict:
    """The target and correct cells of one labelled image (empty where the label is missing)."""
    cells = {}
    for h in spec_heads(spec):
        t = target[h.name]
        if h.kind == "multiclass":
            if int(t) == MISSING:
                continue
            cells[f"{h.prefix}target"] = h.classes[int(t)]
            if predicted is not None:
                cells[f"{h.prefix}correct"] = int(predicted[f"{h.prefix}label"] == h.classes[int(t)])
        else:
            t = torch.as_tensor(t)
            if bool((t == MISSING).all()):
                continue
            labels = [c for c, v in zip(h.classes, t.tolist(), strict=True) if v == 1]
            cells[f"{h.prefix}target"] = sep.join(labels)
            if predicted is not None:  # the exact set
                cells[f"{h.prefix}correct"] = int(
                    set(filter(None, predicted[f"{h.prefix}labels"].split(sep))) == set(labels)
                )
    return cells


def describe(probs, spec: dict, topk: int = 5) -> dict:
    """serve's answer for one image: per head, the label and top-k (multiclass) or the labels above threshold."""
    out = {}
    for h in spec["heads"]:
        p = [float(x) for x in probs[h["start"] : h["stop"]]]
        order = sorted(range(len(p)), key=lambda i: -p[i])
        if h["kind"] == "multiclass":
            top = [{"label": h["classes"][i], "prob": p[i]} for i in order[:topk]]
            out[h["name"]] = {"label": top[0]["label"], "prob": top[0]["prob"], "topk": top}
        else:
            chosen = [i for i in order if p[i] >= h["thresholds"][i]]
            out[h["name"]] = {
                "labels": [{"label": h["classes"][i], "prob": p[i]} for i in chosen],
                "probs": {h["classes"][i]: p[i] for i in range(len(p))},
            }
    return out[spec["heads"][0]["name"]] if spec["name"] != "multitask" else {"heads": out}


def collect_outputs(model, loader) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(logits (N, total), targets {head: tensor}, dataset indices (N,)) over an `indexed_loader`."""
    from visiontune.inference import collect_batches

    logits, targets, indices = collect_batches(model, loader)
    return logits, {k: torch.cat([t[k] for t in targets]) for k in targets[0]}, indices


def deployed_probabilities(logits, spec: dict):
    """A deployment's logits (numpy, N x outputs) -> each head's probabilities, from preprocess.json's
    `task` and `temperature` alone."""
    z = torch.from_numpy(logits).float()
    return probabilities(z, spec_heads(spec["task"]), float(spec.get("temperature", 1.0))).numpy()
