"""The heads: what the model predicts per image, as one logit vector.

Every task is a list of heads (`Head`); `resolve_task` gives the full task of any model:
- `multiclass` (the default): one head, `class`, one label per image, softmax and cross-entropy.
- `multilabel`: a set of labels per image, one sigmoid per label.
- `multitask`: several heads on the shared backbone features, each `multiclass` or `multilabel`.

The model's output is one logit vector: the heads' logits side by side (`Head.start:Head.stop`), so
export and serve move a single tensor; `head_probabilities` turns it into each head's probabilities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

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
    """True for the tasks with labels in a CSV (multilabel, multitask); multiclass reads class folders."""
    return bool(task) and task.get("name", "multiclass") != "multiclass"


CLASS_HEAD = "class"


def resolve_task(task: dict | None, class_names) -> dict:
    """The full task of a model: a multilabel or multitask config with its heads' classes as it is, and
    for multiclass (`task` None, as checkpoints store it) the one head `class` over `class_names`."""
    if is_multi(task):
        return task
    head = {"name": CLASS_HEAD, "kind": "multiclass", "classes": [str(c) for c in class_names], "weight": 1.0}
    return {"name": "multiclass", "heads": [head]}


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
    """What `task.heads` must be, when it is not (config.py's check of task.heads): a list of {name, column, kind, weight}."""
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


# -- the head modules
class ClassHead(nn.Sequential):
    """The head of a multiclass model: `make_head`'s layers (state-dict keys `head.<i>.weight`, as every
    multiclass checkpoint has them) and the attributes every head has: `thresholds` (one per output,
    unused by softmax heads, not saved) and `log_vars` (none)."""

    def __init__(self, num_features: int, num_classes: int, dropout: float, hidden: int | None):
        super().__init__(*make_head(num_features, num_classes, dropout, hidden))
        self.register_buffer("thresholds", torch.full((num_classes,), DEFAULT_THRESHOLD), persistent=False)
        self.log_vars = None


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


def build_head(task: dict, num_features: int, dropout: float, hidden: int | None) -> nn.Module:
    """The head module of a resolved task (`resolve_task`)."""
    if task["name"] == "multiclass":
        return ClassHead(num_features, len(task["heads"][0]["classes"]), dropout, hidden)
    threshold = task.get("threshold", DEFAULT_THRESHOLD)
    threshold = DEFAULT_THRESHOLD if threshold == "auto" or threshold is None else float(threshold)
    uncertainty = task.get("loss_weighting", "fixed") == "uncertainty"
    return MultiHead(task_heads(task), num_features, dropout, hidden, threshold, uncertainty)


# -- probabilities: the one place where logits and a temperature become probabilities
def head_probabilities(logits: torch.Tensor, heads: list[Head], temperature: float = 1.0) -> torch.Tensor:
    """Each head's probabilities side by side, in float32: softmax(logits / T) per multiclass head (T is
    the calibrated temperature), a sigmoid per label of a multilabel head (thresholds, not T, decide there).

    Everything that reports probabilities goes through here: the module's predict_step, and every
    command after training through `deploy.session.InferenceSession` (an exported model's logits too)."""
    parts = []
    for h in heads:  # one head has the whole vector: no slice, no concat (an exported graph stays plain)
        z = logits if len(heads) == 1 else logits[:, h.start : h.stop]
        parts.append(tempered_softmax(z, temperature) if h.kind == "multiclass" else z.float().sigmoid())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def tempered_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in float32: a multiclass head's probabilities (`head_probabilities`), and
    what calibration measures."""
    return (logits.float() / float(temperature)).softmax(-1)
