"""Fine-tuning strategies: what is frozen stays bit-identical, BN stays in eval, resume is exact."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from helpers import changed, make_run, snapshot
from torch.nn.modules.batchnorm import _BatchNorm

from visiontune.errors import UserError
from visiontune.training.finetune import FreezeGroups, Gradual, create_schedule, select_groups


class BNModeProbe(L.Callback):
    """Records the `training` flag of every BN layer as it runs forward during training steps."""

    def __init__(self):
        self.modes: dict[str, set[bool]] = {}
        self.backbone_out_requires_grad: set[bool] = set()

    def on_fit_start(self, trainer, pl_module):
        for name, m in pl_module.backbone.named_modules():
            if isinstance(m, _BatchNorm):
                m.register_forward_pre_hook(self._hook(name))
        pl_module.backbone.register_forward_hook(self._out_hook)

    def _hook(self, name):
        def hook(module, args):
            if module.training or torch.is_grad_enabled():  # training steps only
                self.modes.setdefault(name, set()).add(module.training)

        return hook

    def _out_hook(self, module, args, out):
        if torch.is_grad_enabled():
            self.backbone_out_requires_grad.add(out.requires_grad)


class LRProbe(L.Callback):
    """Each group's LR at the first batch of every epoch, and the requires_grad state per group."""

    def __init__(self):
        self.lrs: dict[int, dict[str, float]] = {}
        self.trainable: dict[int, list[bool]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        epoch = trainer.current_epoch
        if epoch not in self.lrs:
            self.lrs[epoch] = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
            self.trainable[epoch] = [
                all(p.requires_grad for _, p in named) for named in pl_module.backbone.group_parameters()
            ]


def test_linear_probe_keeps_backbone_and_bn_stats_bit_identical():
    probe = BNModeProbe()
    trainer, model, dm, _ = make_run(
        {"name": "linear_probe"}, epochs=2, callbacks=[probe], limit_val_batches=1
    )
    before = snapshot(model)
    trainer.fit(model, datamodule=dm)
    after = snapshot(model)
    assert changed(before, after, "backbone.") == set()  # weights, BN affine and running stats
    assert changed(before, after, "head.")
    assert all(p.grad is None for p in model.backbone.parameters())
    assert probe.modes and all(modes == {False} for modes in probe.modes.values()), "frozen BN left eval mode"
    assert probe.backbone_out_requires_grad == {False}, "autograd went through the frozen backbone"


def test_train_bn_lets_frozen_batchnorm_learn():
    trainer, model, dm, _ = make_run({"name": "linear_probe", "train_bn": True}, limit_val_batches=1)
    before = snapshot(model)
    trainer.fit(model, datamodule=dm)
    moved = changed(before, snapshot(model), "backbone.")
    assert any(k.endswith("running_mean") for k in moved)
    assert any(k.endswith("bn1.weight") for k in moved)
    assert not any(k.endswith("conv1.weight") for k in moved)


class EpochSnapshots(L.Callback):
    def __init__(self):
        self.states: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append(snapshot(pl_module))


def test_freeze_unfreeze_trains_backbone_after_the_epoch_with_configured_lrs():
    lrs, snaps = LRProbe(), EpochSnapshots()
    finetune = {
        "name": "freeze_unfreeze",
        "unfreeze_at_epoch": 1,
        "backbone_lr_mult": 0.5,
        "layer_decay": 0.8,
    }
    trainer, model, dm, _ = make_run(finetune, epochs=2, callbacks=[lrs, snaps], limit_val_batches=1)
    before = snapshot(model)
    trainer.fit(model, datamodule=dm)
    assert lrs.trainable[0] == [False] * 5 and lrs.trainable[1] == [True] * 5
    assert changed(before, snaps.states[0], "backbone.") == set()
    moved = changed(snaps.states[0], snaps.states[1], "backbone.")
    for group in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        assert any(k.startswith(f"backbone.body.{group}.") for k in moved), group
    # LR per group = lr * mult * decay ** depth, unchanged by unfreezing; the scheduler saw every group
    expected = {"head": 0.05}
    for depth, name in enumerate(["layer4", "layer3", "layer2", "layer1", "stem"]):
        expected[f"backbone.{name}"] = 0.05 * 0.5 * 0.8**depth
    for epoch in (0, 1):
        for name, lr in expected.items():
            assert lrs.lrs[epoch][name] == pytest.approx(lr), (epoch, name)
    assert len(trainer.optimizers[0].param_groups) == len(
        trainer.lr_scheduler_configs[0].scheduler.lr_lambdas
    )


def test_unfreeze_warmup_ramps_new_groups():
    strategy = create_schedule(
        {"name": "freeze_unfreeze", "unfreeze_at_epoch": 2, "unfreeze_warmup_steps": 4}, ["a", "b", "c"]
    )
    spe = 10
    assert strategy.lr_gate(-1, 0, spe) == 1.0
    assert strategy.lr_gate(0, 19, spe) == 1.0  # hard freeze: no gradient, LR left alone
    strategy.soft = True
    assert strategy.lr_gate(0, 19, spe) == 0.0  # soft freeze (DDP): LR 0 until it unfreezes
    assert [strategy.lr_gate(0, s, spe) for s in (20, 21, 23, 30)] == [0.25, 0.5, 1.0, 1.0]


def test_gradual_unfreezes_one_more_group_per_step_of_its_schedule():
    gradual = Gradual(["a", "b", "c", "d"], every_k_epochs=2)
    frozen = [gradual.frozen_groups(e) for e in range(10)]
    assert frozen[:2] == [{0, 1, 2, 3}] * 2
    assert frozen[2:4] == [{0, 1, 2}] * 2
    assert frozen[4] == {0, 1} and frozen[6] == {0} and frozen[8] == set()
    milestones = Gradual(["a", "b", "c"], milestones=[1, 3])
    assert [milestones.frozen_groups(e) for e in range(5)] == [{0, 1, 2}, {0, 1}, {0, 1}, {0}, {0}]


def test_gradual_in_a_run():
    lrs = LRProbe()
    trainer, model, dm, _ = make_run(
        {"name": "gradual", "every_k_epochs": 1}, epochs=3, callbacks=[lrs], limit_val_batches=1
    )
    trainer.fit(model, datamodule=dm)
    assert lrs.trainable == {0: [False] * 5, 1: [False] * 4 + [True], 2: [False] * 3 + [True] * 2}


def test_freeze_groups_middle_range_freezes_exactly_those():
    trainer, model, dm, _ = make_run({"name": "freeze_groups", "groups": "1:-1"}, limit_val_batches=1)
    before = snapshot(model)
    trainer.fit(model, datamodule=dm)
    moved = changed(before, snapshot(model), "backbone.")
    groups = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    touched = {g for g in groups for k in moved if k.startswith(f"backbone.body.{g}.")}
    assert touched == {"conv1", "bn1", "layer4"}
    assert select_groups(["a", "b", "c", "d"], "0:2", None) == {0, 1}
    assert select_groups(["stem", "layer1", "layer2"], None, "^layer") == {1, 2}
    assert isinstance(create_schedule({"name": "freeze_groups", "groups": [0]}, ["a", "b"]), FreezeGroups)


def test_unknown_strategy_or_key_is_a_user_error():
    with pytest.raises(UserError, match="unknown fine-tuning strategy finetune=nope"):
        create_schedule({"name": "nope"}, ["a"])
    with pytest.raises(UserError, match="unexpected keyword argument 'groupz'"):
        create_schedule({"name": "freeze_groups", "groupz": "0:1"}, ["a"])


@pytest.mark.parametrize(
    ("groups", "pattern", "message"),
    [
        ("99", None, "group 99 is out of range for 4 groups"),
        ("-5", None, "group -5 is out of range"),
        ([0, 7], None, "group 7 is out of range"),
        ("7:99", None, "slice bound 7 is out of range"),
        ("1:99", None, "slice bound 99 is out of range"),
        ("a:b", None, "slice bound 'a' is not an integer"),
        ("1:2:3", None, "use start:stop"),
        ("x", None, "index 'x' is not an integer"),
        ("2:2", None, "selects no group"),
        (None, "([", "is not a valid regex"),
        (None, "^nothing$", "selects no group"),
    ],
)
def test_freeze_groups_out_of_range_or_malformed_is_an_error(groups, pattern, message):
    """No modulo wrapping ("99" must not freeze group 3) and no silent clamping ("7:99")."""
    with pytest.raises(UserError, match=re.escape(message)):
        select_groups(["stem", "s1", "s2", "final"], groups, pattern)


def test_freeze_groups_in_range_selections():
    names = ["stem", "s1", "s2", "final"]
    assert select_groups(names, "-1", None) == {3}
    assert select_groups(names, 3, None) == {3}
    assert select_groups(names, ":4", None) == {0, 1, 2, 3}
    assert select_groups(names, "1:-1", None) == {1, 2}
    assert select_groups(names, None, r"^s\d") == {1, 2}


class StopAfter(L.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_resume_after_unfreeze_matches_an_uninterrupted_run(tmp_path):
    finetune = {"name": "freeze_unfreeze", "unfreeze_at_epoch": 1, "layer_decay": 0.7}
    opt = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}
    sched = {"name": "cosine"}
    straight, model_a, dm_a, _ = make_run(
        finetune, epochs=3, optimizer=opt, scheduler=sched, limit_val_batches=1
    )
    straight.fit(model_a, datamodule=dm_a)

    # the same 3-epoch run, interrupted after epoch 1 (so the cosine schedule spans 3 epochs)
    stop = StopAfter(epoch=1)
    first, model_b, dm_b, _ = make_run(
        finetune, epochs=3, optimizer=opt, scheduler=sched, callbacks=[stop], limit_val_batches=1
    )
    first.fit(model_b, datamodule=dm_b)
    ckpt = tmp_path / "after_unfreeze.ckpt"
    first.save_checkpoint(ckpt)
    torch.load(ckpt, weights_only=True)  # plain hyperparameters only

    lrs = LRProbe()
    resumed, model_c, dm_c, _ = make_run(
        finetune, epochs=3, optimizer=opt, scheduler=sched, callbacks=[lrs], limit_val_batches=1
    )
    resumed.fit(model_c, datamodule=dm_c, ckpt_path=ckpt)
    assert lrs.trainable[2] == [True] * 5, "resume re-froze the backbone"
    a, c = snapshot(model_a), snapshot(model_c)
    for key in a:
        assert torch.allclose(a[key].float(), c[key].float(), atol=1e-6), key
    final_a = {g["name"]: g["lr"] for g in straight.optimizers[0].param_groups}
    final_c = {g["name"]: g["lr"] for g in resumed.optimizers[0].param_groups}
    assert final_a == pytest.approx(final_c)


def test_ddp_soft_freeze_unfreezes_and_ranks_agree(tmp_path):
    """2 CPU processes (gloo): frozen epoch leaves the backbone alone, then it trains, identically on both ranks."""
    from pathlib import Path

    from helpers import run

    result = run(str(Path(__file__).parent / "ddp_unfreeze_worker.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    initial = torch.load(tmp_path / "rank0_initial.pt")
    states = {(r, e): torch.load(tmp_path / f"rank{r}_epoch{e}.pt") for r in (0, 1) for e in (0, 1)}
    weights = [k for k in initial if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for rank in (0, 1):
        assert all(
            torch.equal(initial[k], v) for k, v in torch.load(tmp_path / f"rank{rank}_initial.pt").items()
        )
        assert all(torch.equal(initial[k], states[rank, 0][k]) for k in initial), "soft-frozen backbone moved"
        assert all(not torch.equal(initial[k], states[rank, 1][k]) for k in weights if "conv" in k), (
            "did not train"
        )
    for k in initial:
        assert torch.equal(states[0, 1][k], states[1, 1][k]), f"ranks disagree on {k}"
