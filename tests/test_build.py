"""build_run: one run built whole from its config; the feature-cache switch as a callback; the model's
input modes (images, or the backbone's own Activations), each said, none guessed."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import FAST, compose_cfg

from visiontune.build import build_run
from visiontune.errors import UserError
from visiontune.models.backbones import Activations


def cfg_for(tmp_path, *overrides: str):
    return compose_cfg([*FAST, "logger=csv", *overrides], tmp_path)


def test_build_run_builds_what_the_config_asks_for(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from visiontune.training.callbacks import BestCheckpoint, LastCheckpoint, SaveOnInterrupt
    from visiontune.training.finetune import ApplyFreeze

    class Watch(L.Callback):
        pass

    watch = Watch()
    stop = "callbacks.early_stopping={monitor: val/loss, mode: min, patience: 1}"
    cfg = cfg_for(tmp_path, "logger=many", stop, "augment.mixup_alpha=0.2")
    run = build_run(cfg, callbacks=[watch])
    assert [type(x) for x in run.loggers] == [CSVLogger, TensorBoardLogger]
    assert run.trainer.loggers == run.loggers
    for kind in (
        ApplyFreeze,
        BestCheckpoint,
        LastCheckpoint,
        SaveOnInterrupt,
        LearningRateMonitor,
        EarlyStopping,
    ):
        assert any(type(c) is kind for c in run.trainer.callbacks), kind
    assert run.best in run.trainer.callbacks and run.freeze in run.trainer.callbacks
    assert run.callbacks[-1] is watch and watch in run.trainer.callbacks
    assert run.best.dirpath == str(tmp_path / "checkpoints") and run.best.monitor == "val/acc"
    # the training extras come with the model: MixUp on, no JSD term, no teacher
    assert run.model.mix is not None and run.model.jsd_weight == 0.0 and run.model.teacher is None
    assert run.feature_cache is None  # finetune=full freezes nothing
    bare = build_run(cfg_for(tmp_path / "bare", "logger=csv"))
    assert bare.model.mix is None and [type(x) for x in bare.loggers] == [CSVLogger]


def test_the_jsd_weight_and_the_teacher_are_the_models_from_construction(tmp_path, tiny_checkpoint):
    from visiontune.training.distill import Teacher

    jsd = build_run(cfg_for(tmp_path / "jsd", "augment=augmix", "augment.jsd=true", "augment.jsd_weight=3"))
    assert jsd.model.jsd_weight == 3.0 and jsd.model.mix is None
    distill = ["distill.alpha=0.3", "distill.temperature=2.5", f"distill.teacher={tiny_checkpoint}"]
    run = build_run(cfg_for(tmp_path / "distill", *distill))
    assert isinstance(run.model.teacher, Teacher) and not run.model.teacher.training
    assert run.model.distill == {"alpha": 0.3, "temperature": 2.5}
    assert not any(k.startswith("teacher") for k in run.model.state_dict())
    # loading the teacher draws nothing from the RNG: the student starts as it would without one
    L.seed_everything(0, verbose=False)
    alone = build_run(cfg_for(tmp_path / "alone")).model.state_dict()
    L.seed_everything(0, verbose=False)
    taught = build_run(cfg_for(tmp_path / "taught", *distill)).model.state_dict()
    assert all(torch.equal(alone[k], taught[k]) for k in alone)


def test_compile_is_refused_for_a_strategy_that_unfreezes_and_applied_otherwise(tmp_path):
    with pytest.raises(UserError, match="torch.compile does not notice layers unfrozen later"):
        build_run(cfg_for(tmp_path / "refused", "finetune=freeze_unfreeze", "model.compile=true"))
    # fast_dev_run skips the timed forward pass, which would compile here
    run = build_run(cfg_for(tmp_path / "compiled", "model.compile=true", "+trainer.fast_dev_run=true"))
    assert isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule)
    assert run.feature_cache is None  # full fine-tuning: nothing frozen to cache


def test_a_whole_run_cache_hard_freezes_and_serves_every_split(tmp_path):
    run = build_run(cfg_for(tmp_path, "finetune=linear_probe"))
    cache = run.feature_cache
    assert cache is not None and cache.until is None and cache.hard_freeze
    assert run.freeze.soft_override is False  # the cached layers never run: not even a soft freeze under DDP
    assert set(cache.features) == {"train_set", "val_set", "test_set"} and cache.seconds > 0
    assert cache in run.trainer.callbacks


class Kinds(L.Callback):
    """Each epoch's batch kinds and the trainer's reload setting while training."""

    def __init__(self):
        self.train, self.val, self.reload = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        kind = "cached" if isinstance(batch[0], Activations) else "images"
        self.train.setdefault(trainer.current_epoch, set()).add(kind)
        self.reload[trainer.current_epoch] = trainer.reload_dataloaders_every_n_epochs

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            kind = "cached" if isinstance(batch[0], Activations) else "images"
            self.val.setdefault(trainer.current_epoch, set()).add(kind)


def test_the_cache_switch_moves_to_images_at_the_unfreeze_epoch_and_puts_the_reload_setting_back(tmp_path):
    kinds = Kinds()
    overrides = [
        "finetune=freeze_unfreeze",
        "finetune.unfreeze_at_epoch=2",
        "trainer.max_epochs=3",
        "+trainer.reload_dataloaders_every_n_epochs=5",  # the user's own setting, restored after the switch
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "test=false",
    ]
    run = build_run(cfg_for(tmp_path, *overrides), callbacks=[kinds])
    assert run.feature_cache.until == 2 and set(run.feature_cache.features) == {"train_set", "val_set"}
    assert run.freeze.soft_override is None  # the backbone unfreezes later: the usual freeze rules
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert kinds.train == {0: {"cached"}, 1: {"cached"}, 2: {"images"}}
    assert kinds.val == {0: {"cached"}, 1: {"cached"}, 2: {"images"}}
    assert kinds.reload == {0: 1, 1: 1, 2: 1}  # reloaded each epoch until both loaders read images
    assert run.trainer.reload_dataloaders_every_n_epochs == 5
    assert run.datamodule.stand_in is None  # nothing served in place of the splits after the fit


def test_forward_is_told_its_input_mode():
    from visiontune.training.module import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier({"backbone": "resnet18", "pretrained": False}, num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    steps = model.backbone.steps()
    with torch.no_grad():
        logits = model(images)
        features = model.backbone(images)
        torch.testing.assert_close(model(Activations(features)), logits)  # the head alone
        a = images
        for _, module in steps[:5]:  # through layer1
            a = module(a)
        torch.testing.assert_close(model(Activations(a, 5)), logits)  # the rest of the backbone
        # each mode is said: a bare 2-D tensor is not taken for features, nor 5-D views for images
        for wrong in (features, images[None], [images]):
            with pytest.raises(TypeError, match="takes images"):
                model(wrong)
        with pytest.raises(ValueError, match="no step 99"):
            model(Activations(a, 99))
    moved = Activations(a, 5).to(torch.float64)
    assert moved.start == 5 and moved.tensor.dtype == torch.float64


def test_a_cached_batch_has_its_batch_size_and_no_ambiguity():
    """Lightning infers the logged values' batch size from the batch: an Activations batch says it once."""
    import warnings

    from lightning.pytorch.utilities.data import extract_batch_size

    batch = [Activations(torch.zeros(7, 4)), torch.zeros(7, dtype=torch.long)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extract_batch_size(batch) == 7


def test_a_backbone_family_says_how_it_runs_step_by_step():
    from visiontune.models.backbones import create_backbone

    x = torch.randn(2, 3, 32, 32)
    for name in ("resnet18", "efficientnet_lite0"):
        net = create_backbone(name, pretrained=False).eval()
        steps = net.steps()
        assert len(steps) > 3
        with torch.no_grad():
            a = x
            for _, module in steps[:3]:
                a = module(a)
            torch.testing.assert_close(net.forward_from(a, 3), net(x))
            torch.testing.assert_close(net.forward_from(x, 0), net(x))
    assert create_backbone("vgg16", pretrained=False).steps() == []  # not known: no prefix cache
