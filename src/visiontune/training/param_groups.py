"""Optimizer parameter groups: pure functions, testable without a Trainer.

Every group exists from step 0, frozen ones included: freezing only flips `requires_grad`, so
schedulers and optimizer state always see the same groups (docs/architecture.md, "Invariants").
"""

from __future__ import annotations

import math

import torch
from torch import nn


def backbone_lr_scale(depth_from_top: int, backbone_lr_mult: float, layer_decay: float) -> float:
    """LR multiplier of a backbone group `depth_from_top` groups below the head (0 = topmost)."""
    return backbone_lr_mult * layer_decay**depth_from_top


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm weights (all tensors of rank < 2) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias")


def _split_decay(named: list[tuple[str, nn.Parameter]], weight_decay: float, base: dict) -> list[dict]:
    decay = [p for n, p in named if not no_weight_decay(n, p)]
    no_decay = [p for n, p in named if no_weight_decay(n, p)]
    out = []
    if decay:
        out.append({**base, "params": decay, "weight_decay": weight_decay})
    if no_decay:
        out.append({**base, "params": no_decay, "weight_decay": 0.0, "name": base["name"] + ".no_decay"})
    return out


def build_param_groups(
    backbone_groups: list[tuple[str, list[tuple[str, nn.Parameter]]]],
    head: list[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 1.0,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Optimizer groups: the head at `lr`, backbone group i at lr * mult * decay ** (depth from top).

    `backbone_groups` is ordered input -> output, as `Backbone.groups`. Each returned dict carries
    `name`, `lr`, `weight_decay` and `group_index` (the backbone group, -1 for the head), so that
    strategies and LR gates can find their groups.
    """
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate must be positive, got {lr}")
    n = len(backbone_groups)
    groups: list[dict] = []
    for i, (name, named) in enumerate(backbone_groups):
        scaled = lr * backbone_lr_scale(n - 1 - i, backbone_lr_mult, layer_decay)
        groups += _split_decay(
            named, weight_decay, {"name": f"backbone.{name}", "lr": scaled, "group_index": i}
        )
    groups += _split_decay(head, weight_decay, {"name": "head", "lr": lr, "group_index": -1})
    return groups


def describe_lrs(optimizer: torch.optim.Optimizer) -> str:
    """Each group's current LR (the no-decay twins share their group's LR and are left out)."""
    groups = enumerate(optimizer.param_groups)
    return ", ".join(
        f"{g.get('name', i)}={g['lr']:.3g}" for i, g in groups if not str(g.get("name")).endswith("no_decay")
    )
