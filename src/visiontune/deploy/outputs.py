"""Predictions as plain values (predict, serve) and the deployable description of a model's heads."""

from __future__ import annotations

import torch

from visiontune.models.heads import MISSING, Head, head_probabilities, task_heads


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
    from visiontune.deploy.inference import collect_batches

    logits, targets, indices = collect_batches(model, loader)
    return logits, {k: torch.cat([t[k] for t in targets]) for k in targets[0]}, indices


def deployed_probabilities(logits, spec: dict):
    """A deployment's logits (numpy, N x outputs) -> each head's probabilities, from preprocess.json's
    `task` and `temperature` alone."""
    z = torch.from_numpy(logits).float()
    return head_probabilities(z, spec_heads(spec["task"]), float(spec.get("temperature", 1.0))).numpy()
