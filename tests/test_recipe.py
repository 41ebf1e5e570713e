"""Training recipe: warmup, clipping, label smoothing, EMA, LR finder, loggers, precision (exact resume:
test_reliability.py)."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import MODEL, SMALL, TINY, make_run, run, snapshot

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
    model.label_smoothing = 0.1
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
        *MODEL,
        "tune.lr_find=true",
        "tune.num_training=30",  # the suggestion skips the first 10 and the last loss
        "data.train_subset=128",
        "data.batch_size=4",  # 32 batches for the finder's 30 steps
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["lr"] == pytest.approx(metrics["lr_find/suggestion"])
    assert (tmp_path / "lr_find.png").is_file()
    # the suggestion is stored where the model reads it, and the checkpoint still rebuilds the model
    from visiontune.training.checkpoints import load_classifier

    model = load_classifier(tmp_path / "checkpoints" / "best.ckpt")
    assert model.hparams.optim["optimizer"]["lr"] == pytest.approx(metrics["lr_find/suggestion"])


def test_plateau_update_is_reduce_on_plateau_for_a_maximised_metric():
    from visiontune.training.schedules import plateau_update

    assert plateau_update(0.5, 0, 0.6, patience=1, factor=0.1) == (0.6, 0, 1.0)
    assert plateau_update(0.6, 0, 0.6, patience=1, factor=0.1) == (0.6, 1, 1.0)
    assert plateau_update(0.6, 1, 0.59, patience=1, factor=0.1) == (0.6, 0, 0.1)


def test_plateau_scheduler_cuts_the_lr_when_val_acc_stalls(monkeypatch):
    """With val/acc pinned, patience 0 cuts every group's LR by `factor` after each validation."""
    lrs = StepLRs()
    sched = {"name": "plateau", "patience": 0, "factor": 0.5}
    trainer, model, dm, _ = make_run(
        {"name": "full"},
        epochs=3,
        scheduler=sched,
        callbacks=[lrs],
        limit_train_batches=1,
        limit_val_batches=1,
    )
    import visiontune.training.module as module
    from visiontune.training.schedules import plateau_update

    # val/acc pinned at 0.3 (the update rule itself is tested above)
    monkeypatch.setattr(
        module, "plateau_update", lambda best, bad, value, *a: plateau_update(best, bad, 0.3, *a)
    )
    trainer.fit(model, datamodule=dm)
    per_epoch = lrs.head_lrs  # one step an epoch
    # epoch 0 sets the best; each later stalled epoch halves the LR
    assert per_epoch == pytest.approx([0.05, 0.05, 0.025])
    assert model.plateau_state.tolist() == pytest.approx([0.3, 0.0, 0.25])


def test_atomic_checkpoint_save_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    from visiontune.training.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, target)

    def crash(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a checkpoi")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("logger", ["mlflow", "wandb"])
def test_mlflow_and_wandb_log_offline_into_the_run_dir(logger, tmp_path, monkeypatch):
    # no MLFLOW_ALLOW_FILE_STORE: current MLflow opens only a database store without it
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if logger == "mlflow":  # imported before the run, which then finds it imported as it finds torch
        from mlflow.tracking import MlflowClient
    # a process of its own: wandb leaves a service and patched modules behind in the process it logs from
    result = run("visiontune.train", *TINY, *MODEL, f"logger={logger}", f"hydra.run.dir={tmp_path}",
                 env={**os.environ, "WANDB_SILENT": "true"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    if logger == "mlflow":  # a SQLite store in the run dir, read as `mlflow ui --backend-store-uri` would
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("visiontune")
        assert experiment.artifact_location == (tmp_path / "mlflow-artifacts").as_uri()
        [found] = client.search_runs([experiment.experiment_id])
        assert found.data.params["seed"] == "42" and found.data.params["model/backbone"] == SMALL
        assert len(client.get_metric_history(found.info.run_id, "val/acc")) == 1  # one epoch
        # 4 steps, fewer than log_every_n_steps=25: the step scalars are logged all the same
        assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss_step")] == [3]
    else:  # offline mode: wandb/offline-run-*/run-*.wandb, ready for `wandb sync`
        runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_early_stopping_on_val_acc_ends_the_run(tiny_cfg, tmp_path):
    stop = "callbacks.early_stopping={monitor: val/acc, mode: max, patience: 0, min_delta: 2.0}"
    train(tiny_cfg(*MODEL, "trainer.max_epochs=5", stop))
    # epoch 0 sets the best; no epoch can beat it by 2.0, so patience 0 stops after epoch 1
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2


class Probe(L.Callback):
    """Records the head's input dtype and the memory format of the first conv weight during training."""

    def on_train_start(self, trainer, pl_module):
        self.dtypes = []
        pl_module.head.register_forward_hook(lambda m, args, out: self.dtypes.append(args[0].dtype))
        self.channels_last = pl_module.backbone.body.conv1.weight.is_contiguous(
            memory_format=torch.channels_last
        )


def test_bf16_autocast_and_channels_last_train_on_cpu(tiny_cfg, tmp_path):
    probe = Probe()
    overrides = ["trainer.precision=bf16-mixed", "model.channels_last=true"]
    train(tiny_cfg("model.backbone=resnet18", "model.pretrained=false", *overrides), callbacks=[probe])
    assert probe.channels_last
    assert probe.dtypes and set(probe.dtypes) == {torch.bfloat16}  # the backbone ran under bf16 autocast
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test/loss"] == metrics["test/loss"]  # not NaN


def test_a_reused_run_dir_is_refused_unless_resumed_or_restarted(tiny_cfg, tmp_path):
    """An old last.ckpt in the run dir is never picked up silently, nor overwritten as best-v1.ckpt."""
    from visiontune.errors import UserError

    cfg = tiny_cfg(*MODEL)
    train(cfg)
    first = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match=r"ckpt_path=.*last\.ckpt, or start fresh with restart=true"):
        train(cfg)
    train(tiny_cfg(*MODEL, "restart=true"))
    aside = list(tmp_path.glob("checkpoints.*/last.ckpt"))
    assert len(aside) == 1 and aside[0].read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert "train/loss" in json.loads((tmp_path / "metrics.json").read_text())
