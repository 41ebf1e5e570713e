"""Predictions as plain values (predict, serve) and the deployable description of a model's heads.

Every task is described the same way (`task_spec`): a multiclass model is one head, `class`."""

from __future__ import annotations

import torch

from visiontune.models.heads import MISSING, Head, task_heads


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


def top_count(h: Head, topk: int) -> int:
    """How many ranked labels predictions.csv gives a multiclass head: topk, at most its classes."""
    return min(int(topk), len(h.classes))


def head_columns(spec: dict, with_target: bool, topk: int = 0) -> list[str]:
    """predictions.csv's column group of each head (no prefix for the one head of multiclass or
    multilabel): label, prob and the top-k labels and probabilities of a multiclass head; labels,
    probs of a multilabel one; then target and correct for labelled data."""
    columns = []
    for h in spec_heads(spec):
        names = ["label", "prob"] if h.kind == "multiclass" else ["labels", "probs"]
        if h.kind == "multiclass":
            for r in range(1, top_count(h, topk) + 1):
                names += [f"top{r}_label", f"top{r}_prob"]
        names += ["target", "correct"] if with_target else []
        columns += [f"{h.prefix}{n}" for n in names]
    return columns


def ranked(p: list[float]) -> list[int]:
    """The indices of `p`, most probable first (equal ones in their order)."""
    return sorted(range(len(p)), key=lambda i: -p[i])


def decide(probs, spec: dict) -> dict:
    """One image's probabilities (the heads side by side) -> {head: (label, prob)} for a multiclass
    head, {head: [(label, prob), ...]} (above the head's thresholds, most probable first) for a multilabel one."""
    probs = [float(p) for p in probs]
    out = {}
    for h in spec["heads"]:
        p = probs[h["start"] : h["stop"]]
        order = ranked(p)
        if h["kind"] == "multiclass":
            out[h["name"]] = (h["classes"][order[0]], p[order[0]])
        else:
            out[h["name"]] = [(h["classes"][i], p[i]) for i in order if p[i] >= h["thresholds"][i]]
    return out


def prediction_cells(probs, spec: dict, sep: str = "|", topk: int = 0) -> dict:
    """The row cells of one image in predictions.csv (`head_columns`)."""
    cells = {}
    decided = decide(probs, spec)
    for h in spec_heads(spec):
        value = decided[h.name]
        if h.kind == "multiclass":
            cells[f"{h.prefix}label"], cells[f"{h.prefix}prob"] = value[0], f"{value[1]:.6f}"
            p = torch.as_tensor(probs[h.start : h.stop])
            top_p, top_i = p.topk(top_count(h, topk))
            for r, (q, i) in enumerate(zip(top_p.tolist(), top_i.tolist(), strict=True), 1):
                cells[f"{h.prefix}top{r}_label"], cells[f"{h.prefix}top{r}_prob"] = h.classes[i], f"{q:.6f}"
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
        order = ranked(p)
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
