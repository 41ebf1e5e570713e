"""Parameter groups: LRs by depth, no weight decay on norm and bias, everything from step 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visiontune.backbones import create_backbone
from visiontune.param_groups import backbone_lr_scale, build_param_groups
from visiontune.schedules import lr_factor


def groups_for(backbone, **kwargs):
    head = nn.Linear(backbone.num_features, 3)
    named = list(zip([g.name for g in backbone.groups], backbone.group_parameters(), strict=True))
    return build_param_groups(named, list(head.named_parameters()), **kwargs), head


def test_lr_follows_depth_from_the_top():
    backbone = create_backbone("resnet18", pretrained=False)
    groups, _ = groups_for(backbone, lr=0.1, weight_decay=0.01, backbone_lr_mult=0.5, layer_decay=0.8)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] == pytest.approx(0.1)
    for depth, name in enumerate(["layer4", "layer3", "layer2", "layer1", "stem"]):
        assert lrs[f"backbone.{name}"] == pytest.approx(0.1 * 0.5 * 0.8**depth)
        assert lrs[f"backbone.{name}.no_decay"] == pytest.approx(0.1 * 0.5 * 0.8**depth)
    assert backbone_lr_scale(2, 1.0, 0.5) == 0.25


def test_every_parameter_once_and_no_decay_on_norm_and_bias():
    backbone = create_backbone("resnet18", pretrained=False)
    groups, head = groups_for(backbone, lr=0.1, weight_decay=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    expected = [id(p) for p in [*backbone.parameters(), *head.parameters()]]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    names = {id(p): n for n, p in [*backbone.named_parameters(), *head.named_parameters()]}
    for g in groups:
        for p in g["params"]:
            is_norm_or_bias = p.ndim < 2
            assert (g["weight_decay"] == 0.0) == is_norm_or_bias, names[id(p)]
    bn = backbone.body.bn1.weight
    assert next(g for g in groups if any(p is bn for p in g["params"]))["weight_decay"] == 0.0


def test_frozen_parameters_are_in_the_optimizer_from_step_0_and_do_not_move():
    backbone = create_backbone("resnet18", pretrained=False)
    groups, head = groups_for(backbone, lr=0.1, weight_decay=0.1)
    for p in backbone.parameters():
        p.requires_grad_(False)
    before = [p.clone() for p in backbone.parameters()]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = head(backbone(torch.randn(2, 3, 32, 32))).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.parameters(), strict=True))
    assert len(opt.param_groups) == len(groups)


def test_schedules():
    assert lr_factor(0, "none", 100, 10, warmup_steps=4) == pytest.approx(0.25)
    assert lr_factor(3, "none", 100, 10, warmup_steps=4) == pytest.approx(1.0)
    assert lr_factor(0, "cosine", 100, 10) == pytest.approx(1.0)
    assert lr_factor(50, "cosine", 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, "cosine", 100, 10) == pytest.approx(0.0)
    assert lr_factor(69, "step", 100, 10, step_size=7, gamma=0.1) == pytest.approx(1.0)
    assert lr_factor(70, "step", 100, 10, step_size=7, gamma=0.1) == pytest.approx(0.1)
    assert lr_factor(0, "onecycle", 100, 10) == pytest.approx(1 / 25)
    assert lr_factor(30, "onecycle", 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, "onecycle", 100, 10) == pytest.approx(1 / 25e4)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, "bogus", 10, 1)
