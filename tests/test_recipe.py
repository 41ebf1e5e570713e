"""Training recipe: warmup, clipping, label smoothing, EMA, LR finder, exact resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import make_run, snapshot

from visiontune.train import train


class StepLRs(L.Callback):
    def __init__(self):
        self.head_lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.head_lrs.append(next(g["lr"] for g in trainer.optimizers[0].param_groups if g["name"] == "head"))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_step_with_linear_warmup(name):
    lrs = StepLRs()
    opt = {"name": name, "lr": 0.01, "weight_decay": 0.01}
    trainer, model, dm, _ = make_run(
        {"name": "full"},
        optimizer=opt,
        scheduler={"name": "none", "warmup_steps": 3},
        callbacks=[lrs],
        limit_val_batches=1,
    )
    before = snapshot(model)
    trainer.fit(model, datamodule=dm)
    assert lrs.head_lrs == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01])
    assert type(trainer.optimizers[0]).__name__.lower() == name
    assert any(not torch.equal(before[k], v) for k, v in snapshot(model).items())


class GradNorms(L.Callback):
    """Total gradient norm as the optimizer sees it (after Lightning's clipping)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module):
        def hook(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        trainer.optimizers[0].register_step_post_hook(hook)


def test_gradient_clipping_bounds_the_total_norm():
    probe = GradNorms()
    trainer, model, dm, _ = make_run(
        {"name": "full"}, callbacks=[probe], gradient_clip_val=0.01, limit_val_batches=1
    )
    trainer.fit(model, datamodule=dm)
    assert probe.norms and max(probe.norms) <= 0.01 * 1.001


def test_label_smoothing_changes_the_loss_as_expected():
    _, model, _, _ = make_run({"name": "full"})
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    model.hparams.label_smoothing = 0.1
    expected = 0.9 * F.cross_entropy(logits, target) + 0.1 * (-F.log_softmax(logits, -1).mean(-1)).mean()
    assert model.loss(logits, target) == pytest.approx(expected.item(), rel=1e-5)


class LiveWeights(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.live = snapshot(pl_module)


def test_ema_weights_differ_from_live_ones_and_are_evaluated():
    from lightning.pytorch.callbacks import EMAWeightAveraging

    live = LiveWeights()
    ema = EMAWeightAveraging(decay=0.9)
    trainer, model, dm, _ = make_run({"name": "full"}, callbacks=[live, ema], limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    final = snapshot(model)  # what test/predict/checkpoints use after fit
    averaged = ema._average_model.module.state_dict()
    weights = [k for k in final if k.endswith("weight")]
    assert all(torch.equal(final[k], averaged[k]) for k in weights)
    assert any(not torch.equal(final[k], live.live[k]) for k in weights)


def test_lr_finder_records_its_suggestion_and_plot(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "model.backbone=resnet18",
        "model.pretrained=false",
        "tune.lr_find=true",
        "tune.num_training=30",
        "data.train_subset=512",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["lr"] == pytest.approx(metrics["lr_find/suggestion"])
    assert (tmp_path / "lr_find.png").is_file()


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    """2 epochs straight == 1 epoch, then resume from last.ckpt for 1 more (weights and metrics)."""
    base = [
        "model.backbone=resnet18",
        "model.pretrained=false",
        "scheduler=none",
        "augment=none",
        "model.head.dropout=0.3",
    ]
    straight_dir, first_dir, resumed_dir = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    from conftest import TINY, compose_cfg

    train(compose_cfg([*TINY, *base, "trainer.max_epochs=2"], straight_dir))
    train(compose_cfg([*TINY, *base, "trainer.max_epochs=1"], first_dir))
    train(
        compose_cfg(
            [*TINY, *base, "trainer.max_epochs=2", f"ckpt_path={first_dir / 'checkpoints' / 'last.ckpt'}"],
            resumed_dir,
        )
    )
    a = torch.load(straight_dir / "checkpoints" / "last.ckpt", weights_only=True)
    c = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), c["state_dict"][key].float(), atol=1e-6), key
    ma = json.loads((straight_dir / "metrics.json").read_text())
    mc = json.loads((resumed_dir / "metrics.json").read_text())
    assert mc["epochs"] == 2
    assert mc["test/acc"] == pytest.approx(ma["test/acc"]) and mc["test/loss"] == pytest.approx(
        ma["test/loss"], rel=1e-5
    )
