"""Parameter groups: LRs by depth, no weight decay on norm and bias, everything from step 0."""

from __future__ import annotations

import pytest
import torch
from helpers import make_run
from torch import nn

from visiontune.models.backbones import create_backbone
from visiontune.training.param_groups import backbone_lr_scale, build_param_groups
from visiontune.training.schedules import lr_factor


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


def test_the_built_optimizer_holds_frozen_groups_from_step_0_and_they_do_not_move():
    """configure_optimizers' own optimizer (SGD, momentum, weight decay): frozen weights stay bit-identical."""
    optimizer = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}
    trainer, model, dm, _ = make_run({"name": "linear_probe"}, optimizer=optimizer, limit_val_batches=1)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer.fit(model, datamodule=dm)
    opt = trainer.optimizers[0]
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in model.parameters())  # every group exists from step 0
    assert {g["name"] for g in opt.param_groups} >= {f"backbone.{g.name}" for g in model.backbone.groups}
    for n, p in model.backbone.named_parameters():
        assert torch.equal(before[n], p), n
        assert p.grad is None and "momentum_buffer" not in opt.state.get(p, {}), n
    head = model.head[-1].weight
    assert opt.state[head]["momentum_buffer"] is not None  # the head did train


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
