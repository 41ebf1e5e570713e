"""The frozen-feature cache: exact features, keys that notice every change, disk storage, runs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from helpers import FAST, compose_cfg

from visiontune.data.cache import ArrayStore
from visiontune.data.files import FileImageDataset
from visiontune.data.standard import TensorImageDataset
from visiontune.data.transforms import eval_transform, train_transform
from visiontune.training.features import cache_key, compute_features, data_fingerprint, weights_hash

TRANSFORM = eval_transform(32, (0.5,) * 3, (0.25,) * 3, "bilinear", 1.0)


def tiny_trunk():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )  # fmt: skip


def tensor_set(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(n) % 3, TRANSFORM)


def test_cached_features_equal_the_live_frozen_output_within_fp16():
    trunk, data = tiny_trunk(), tensor_set()
    trunk.train()  # the cache computes in eval mode and restores the mode
    features = compute_features(trunk, data, batch_size=7)
    assert trunk.training and features.dtype == np.float16 and features.shape == (20, 8)
    trunk.eval()
    with torch.no_grad():
        live = trunk(torch.stack([data[i][0] for i in range(20)]))
    torch.testing.assert_close(torch.from_numpy(features.astype(np.float32)), live, rtol=1e-3, atol=1e-3)


def test_every_part_of_the_key_invalidates_it(tmp_path):
    trunk, data = tiny_trunk(), tensor_set()
    base = dict(backbone="tiny", weights=weights_hash(trunk), frozen=["g0", "g1"], transform=TRANSFORM,
                data=data_fingerprint(data))  # fmt: skip
    key = cache_key(**base)
    assert cache_key(**base) == key
    with torch.no_grad():
        trunk[0].weight[0, 0, 0, 0] += 1e-3
    changes = {
        "backbone": "other",
        "weights": weights_hash(trunk),
        "frozen": ["g0"],
        "transform": eval_transform(40, (0.5,) * 3, (0.25,) * 3, "bilinear", 1.0),
        "data": data_fingerprint(tensor_set(seed=1)),
    }
    for part, value in changes.items():
        assert cache_key(**{**base, part: value}) != key, part
    # a file that changes (size or mtime) changes the fingerprint of a folder dataset
    from PIL import Image

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (8, 8), i).save(paths[-1])
    files = FileImageDataset([str(p) for p in paths], [0, 1, 2], TRANSFORM)
    before = data_fingerprint(files)
    Image.new("L", (9, 9), 7).save(paths[1])
    assert data_fingerprint(files) != before


def test_store_round_trip_detects_corruption_and_survives_an_unwritable_dir(tmp_path, caplog):
    features = np.arange(40, dtype=np.float16).reshape(10, 4)
    store = ArrayStore(tmp_path / "cache")
    assert store.load("k1", np.float16) is None
    store.save("k1", features)
    np.testing.assert_array_equal(np.asarray(store.load("k1", np.float16)), features)
    assert store.load("k2", np.float16) is None  # another key is another file
    # a truncated file is detected by its size and rebuilt
    data = tmp_path / "cache" / "k1.npy"
    data.write_bytes(data.read_bytes()[:-8])
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        assert store.load("k1", np.float16) is None
    assert "rebuilding" in caplog.text
    # a meta file naming another key is stale
    store.save("k1", features)
    meta = tmp_path / "cache" / "k1.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "other"}))
    assert store.load("k1", np.float16) is None
    # an unwritable place only warns
    blocked = tmp_path / "file"
    blocked.write_text("not a dir")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        ArrayStore(blocked / "cache").save("k1", features)
    assert "in memory only" in caplog.text


def probe(tmp_path, name, *extra):
    return compose_cfg(
        [*FAST, "finetune=linear_probe", "logger=csv", "scheduler=none", *extra], tmp_path / name
    )


def test_linear_probe_on_cached_features_matches_the_uncached_run(tmp_path, caplog):
    from visiontune.train import train
    from visiontune.training.checkpoints import load_checkpoint

    cache = tmp_path / "features"
    with caplog.at_level(logging.INFO, logger="visiontune"):
        train(probe(tmp_path, "cached", f"finetune.cache_dir={cache}"))
    assert "head trains on its features" in caplog.text
    assert len(list(cache.glob("*.npy"))) == 3  # train, val, test
    train(probe(tmp_path, "live", "finetune.cache_features=false"))
    cached = load_checkpoint(tmp_path / "cached" / "checkpoints" / "last.ckpt")["state_dict"]
    live = load_checkpoint(tmp_path / "live" / "checkpoints" / "last.ckpt")["state_dict"]
    for key in live:
        if key.startswith("backbone."):  # frozen: bit-identical either way
            assert torch.equal(cached[key], live[key]), key
        else:  # the head saw fp16-rounded features
            torch.testing.assert_close(cached[key], live[key], atol=2e-3, rtol=0)
    m_cached = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    m_live = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert abs(m_cached["test/acc"] - m_live["test/acc"]) <= 1 / 32 + 1e-6
    # a second run reads the stored features instead of computing them
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        train(probe(tmp_path, "again", f"finetune.cache_dir={cache}"))
    assert "read from" in caplog.text and "computed" not in caplog.text


@pytest.mark.parametrize(
    "override, reason",
    [("finetune=full", "freezes no layer at the start"), ("augment=flip", "is random")],
)
def test_cache_true_where_not_exact_is_refused(tmp_path, override, reason):
    from visiontune.errors import UserError
    from visiontune.train import train

    cfg = compose_cfg([*FAST, "finetune=linear_probe", override, "finetune.cache_features=true"], tmp_path)
    with pytest.raises(UserError, match=reason):
        train(cfg)


@pytest.mark.parametrize("backbone, groups", [("efficientnet_lite0", {0, 1, 2}), ("resnet18", {0, 1})])
def test_prefix_split_runs_the_same_network(backbone, groups):
    from visiontune.models.backbones import create_backbone
    from visiontune.training.features import prefix_split

    net = create_backbone(backbone, pretrained=False).eval()
    split = prefix_split(net, groups)
    assert split is not None and split.names[-1] in ("blocks.1", "layer1")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(split.rest(split.prefix(x)), net(x), atol=1e-5, rtol=1e-5)
        stored = split.prefix(x).half().float()  # as the cache keeps it
        torch.testing.assert_close(split.rest(stored), net(x), atol=2e-2, rtol=1e-2)
    assert prefix_split(net, {1, 2}) is None  # frozen groups that do not start at the input


def test_freeze_groups_trains_on_the_cached_prefix(tmp_path, caplog):
    from visiontune.train import train
    from visiontune.training.checkpoints import load_checkpoint

    base = [*FAST, "model.backbone=resnet18", "finetune=freeze_groups", "finetune.groups=0:2", "logger=csv",
            "scheduler=none"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="visiontune"):
        train(compose_cfg(base, tmp_path / "cached"))
    assert "up to layer1 run once per image" in caplog.text
    train(compose_cfg([*base, "finetune.cache_features=false"], tmp_path / "live"))
    cached = load_checkpoint(tmp_path / "cached" / "checkpoints" / "last.ckpt")["state_dict"]
    live = load_checkpoint(tmp_path / "live" / "checkpoints" / "last.ckpt")["state_dict"]
    frozen = [
        k for k in live if k.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"))
    ]
    assert frozen and all(torch.equal(cached[k], live[k]) for k in frozen)
    # the layers above the cut train (on fp16-rounded activations: a random-init ResNet's gradients are
    # too sensitive to compare them with the live run's; test_prefix_split_runs_the_same_network checks
    # the forward pass itself)
    import lightning as L

    from visiontune.build import build_datamodule, build_model

    cfg = compose_cfg(base, tmp_path / "init")
    L.seed_everything(cfg.seed)
    init = build_model(cfg, build_datamodule(cfg)).state_dict()
    for k in [
        k for k in live if k.startswith(("backbone.body.layer2", "backbone.body.layer4")) and "conv" in k
    ]:
        assert not torch.equal(cached[k], init[k]) and not torch.equal(live[k], init[k]), k


def test_cache_views_serve_k_augmented_views(tmp_path):
    from visiontune.training.features import FeatureDataset, compute_views

    trunk = tiny_trunk()
    flip = tensor_set()
    flip.transform = train_transform(
        {"name": "flip", "hflip": 0.5}, 32, (0.5,) * 3, (0.25,) * 3, "bilinear", 1.0
    )
    features = compute_views(trunk, flip, batch_size=8, views=4, seed=0)
    assert features.shape == (80, 8)
    assert not np.array_equal(features[:20], features[20:40])  # another draw of the flips
    np.testing.assert_array_equal(
        features, compute_views(trunk, flip, batch_size=8, views=4, seed=0)
    )  # seeded
    data = FeatureDataset(features, flip, views=4)
    assert len(data) == 20
    torch.manual_seed(0)
    seen = {tuple(data[3][0].tolist()) for _ in range(50)}
    stored = {tuple(features[v * 20 + 3].astype(np.float32).tolist()) for v in range(4)}
    assert seen <= stored and len(seen) >= 2 and data[3][1] == int(flip.labels[3])


def test_feature_dataset_keeps_the_labels_for_balanced_sampling():
    from visiontune.training.features import FeatureDataset

    data = tensor_set()
    features = compute_features(tiny_trunk(), data)
    cached = FeatureDataset(features, data)
    assert torch.equal(cached.labels, data.labels)


def test_a_batched_read_equals_the_per_sample_reads_and_skips_unreadable_rows():
    from torch.utils.data import DataLoader

    from visiontune.data.files import collate_skip_none
    from visiontune.training.features import FeatureDataset

    data = tensor_set()
    features = compute_features(tiny_trunk(), data)
    features[3] = np.nan  # an unreadable image
    cached = FeatureDataset(features, data)
    order = [5, 3, 0, 7, 19]
    batch, y = collate_skip_none(cached.__getitems__(order))
    assert batch.start is None  # the backbone's output: the features the head reads
    x = batch.tensor
    one = [cached[i] for i in order if cached[i] is not None]
    assert torch.equal(x, torch.stack([r for r, _ in one])) and y.tolist() == [t for _, t in one]
    assert x.dtype == torch.float32 and len(y) == 4
    assert collate_skip_none(cached.__getitems__([3])) is None  # every image unreadable: a skipped batch
    loader = DataLoader(cached, batch_size=8, collate_fn=collate_skip_none)  # the DataLoader takes this path
    xs, ys = zip(*loader, strict=True)
    xs = [b.tensor for b in xs]
    assert torch.cat(xs).shape == (19, features.shape[1]) and torch.equal(
        torch.cat(ys), data.labels[[i for i in range(20) if i != 3]]
    )


def kind(x) -> str:
    """What a batch's input is: the cached backbone features, or images."""
    from visiontune.models.backbones import Activations

    if isinstance(x, Activations):
        return "features" if x.start is None else f"activations:{x.start}"
    return f"images:{x.ndim}d"


class BatchKinds(__import__("lightning").Callback):
    """What each epoch's training and validation batches were (cached features or images), the head's
    weights and the trainer's reload setting at the end of each training epoch."""

    def __init__(self):
        self.train, self.val, self.heads, self.top, self.reload = {}, {}, [], [], []

    def on_train_start(self, trainer, pl_module):
        self.top.append(list(pl_module.backbone.parameters())[-1].detach().clone())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.setdefault(trainer.current_epoch, set()).add(kind(batch[0]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.setdefault(trainer.current_epoch, set()).add(kind(batch[0]))

    def on_train_epoch_end(self, trainer, pl_module):
        self.heads.append({k: v.detach().clone() for k, v in pl_module.head.state_dict().items()})
        self.top.append(list(pl_module.backbone.parameters())[-1].detach().clone())
        self.reload.append(trainer.reload_dataloaders_every_n_epochs)


def run_with(cfg, callback):
    from visiontune.train import train

    train(cfg, callbacks=[callback])


@pytest.mark.parametrize("strategy", ["freeze_unfreeze", "gradual"])
def test_the_opening_frozen_epochs_train_on_cached_features_then_the_images_return(
    tmp_path, caplog, strategy
):
    """freeze_unfreeze (epoch 0 frozen) and gradual (all groups frozen at epoch 0): epoch 0 reads
    cached features, epoch 1 the images through the unfrozen backbone; epoch 0's head matches the
    uncached run's within fp16 rounding, and the backbone trains from epoch 1 on."""
    extra = (
        ["finetune.unfreeze_at_epoch=1"] if strategy == "freeze_unfreeze" else ["finetune.every_k_epochs=1"]
    )
    overrides = [
        *FAST,
        f"finetune={strategy}",
        *extra,
        "trainer.max_epochs=2",
        "logger=csv",
        "scheduler=none",
        "finetune.cache_features=true",  # auto leaves a single frozen epoch uncached (no time to gain)
    ]
    cached, live = BatchKinds(), BatchKinds()
    with caplog.at_level(logging.INFO, logger="visiontune"):
        run_with(compose_cfg(overrides, tmp_path / "cached"), cached)
    assert "epochs 0-0 (backbone frozen) train the head on cached features" in caplog.text
    assert cached.train == {0: {"features"}, 1: {"images:4d"}}
    assert cached.val == {0: {"features"}, 1: {"images:4d"}}
    assert cached.reload == [1, 0]  # loaders reloaded for the switch, then the trainer's own setting
    run_with(compose_cfg([*overrides, "finetune.cache_features=false"], tmp_path / "live"), live)
    assert live.train == {0: {"images:4d"}, 1: {"images:4d"}}
    for key, value in live.heads[0].items():
        torch.testing.assert_close(cached.heads[0][key], value, atol=2e-3, rtol=0)
    assert torch.equal(cached.top[0], cached.top[1])  # epoch 0: the top group frozen, bit for bit
    assert not torch.equal(cached.top[1], cached.top[2])  # epoch 1: it trains, on the images
    metrics = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0 <= metrics["test/acc"] <= 1
    assert metrics["feature_cache_s"] > 0 and metrics["peak_rss_mb"] > 100  # torch alone takes more
    assert "feature_cache_s" not in json.loads((tmp_path / "live" / "metrics.json").read_text())


def test_the_opening_frozen_epochs_are_cached_under_max_steps_too_but_not_under_ddp(tmp_path):
    from visiontune.build import build_datamodule, build_model
    from visiontune.training.features import cache_applies, frozen_until

    cfg = compose_cfg(
        [*FAST, "finetune=freeze_unfreeze", "trainer.max_epochs=null", "+trainer.max_steps=20"], tmp_path
    )
    model = build_model(cfg, build_datamodule(cfg))
    assert frozen_until(model.freeze_schedule, None) == 1
    assert frozen_until(model.freeze_schedule, -1) == 1  # Lightning's endless run unfreezes too
    assert frozen_until(model.freeze_schedule, 1) is None  # a one-epoch run never unfreezes
    assert cache_applies(model, cfg) is None
    assert "under DDP" in cache_applies(model, cfg, distributed=True)


def test_frozen_layers_with_dropout_or_stochastic_depth_are_not_cached(tmp_path):
    """Live frozen layers stay in training mode (only BatchNorm is frozen), so their dropout draws."""
    from visiontune.build import build_datamodule, build_model
    from visiontune.training.features import cache_applies

    cfg = compose_cfg([*FAST, "model.backbone=resnet18", "finetune=linear_probe"], tmp_path)
    model = build_model(cfg, build_datamodule(cfg))
    assert cache_applies(model, cfg) is None
    model.backbone.body.layer4.add_module("drop", torch.nn.Dropout(0.0))  # a zero rate draws nothing
    assert cache_applies(model, cfg) is None
    model.backbone.body.layer4.add_module("drop", torch.nn.Dropout(0.1))
    assert "Dropout, which is random in training" in cache_applies(model, cfg)


def test_auto_caches_two_opening_frozen_epochs_but_not_one(tmp_path, caplog):
    from visiontune.build import build_datamodule, build_model
    from visiontune.training.features import plan_feature_cache

    for at in (1, 2):
        overrides = ["finetune=freeze_unfreeze", f"finetune.unfreeze_at_epoch={at}", "trainer.max_epochs=3"]
        cfg = compose_cfg([*FAST, *overrides], tmp_path / str(at))
        dm = build_datamodule(cfg)
        model = build_model(cfg, dm)
        with caplog.at_level(logging.INFO, logger="visiontune"):
            cache = plan_feature_cache(model, cfg)
        if at == 1:
            assert cache is None
            continue
        assert cache.until == 2 and not cache.hard_freeze  # the backbone unfreezes: no hard freeze
        assert cache.build(model, dm, cfg) and set(cache.features) == {"train_set", "val_set"}
        assert plan_feature_cache(model, cfg, resumed_epoch=2) is None  # resumed after the unfreeze point
    assert "costs what its one frozen epoch would save" in caplog.text


def test_linear_probe_on_cached_features_under_ddp(tmp_path):
    """The cached layers get no gradient: they must be hard-frozen, or DDP waits for their gradients."""
    from helpers import run

    result = run("visiontune.train", *FAST, "finetune=linear_probe", "trainer=ddp_cpu", "trainer.max_epochs=2",
                 f"hydra.run.dir={tmp_path / 'ddp'}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "head trains on its features" in result.stderr + result.stdout
