"""The frozen-feature cache (`finetune.cache_features=auto|true|false`).

When the whole backbone stays frozen for the run (finetune=linear_probe) and the images reach it through
a deterministic transform, its output for an image never changes. It is computed once per split
(batched, under inference mode, stored as fp16), and the head trains on it: an epoch then costs a few
matrix products instead of a forward pass through the backbone.

The cache key covers everything the features depend on: the backbone and a hash of its weights, the
frozen groups, the transform, and the data (file names, sizes and mtimes, or the in-memory images).
With `finetune.cache_dir` set, the features are also kept on disk (a memory-mapped .npy beside a JSON
with its key and shape), so later runs (a sweep's trials) skip the backbone entirely; a file whose key
or size does not match is rebuilt, and a cache dir that cannot be written falls back to memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from visiontune.data.cache import ArrayStore, files_fingerprint
from visiontune.data.files import Collated, collate_skip_none

log = logging.getLogger("visiontune")
CHOICES = ("auto", True, False)


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of every tensor of the module's state (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def data_fingerprint(dataset: Dataset) -> str:
    """What a dataset's images are: file paths with sizes and mtimes, or the bytes of in-memory images."""
    digest = hashlib.sha256()
    if hasattr(dataset, "paths"):
        digest.update(files_fingerprint(dataset.paths).encode())
    elif hasattr(dataset, "images"):
        images = dataset.images.contiguous()
        digest.update(f"{tuple(images.shape)}:{images.dtype}".encode())
        digest.update(images.numpy().tobytes())
    else:
        raise TypeError(f"cannot fingerprint a {type(dataset).__name__}")
    return digest.hexdigest()


def cache_key(backbone: str, weights: str, frozen: list[str], transform, data: str) -> str:
    """One hex key for the features of one split; any change of its parts gives another key."""
    parts = {"backbone": backbone, "weights": weights, "frozen": list(frozen), "transform": repr(transform),
             "data": data}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def compute_features(trunk: torch.nn.Module, dataset: Dataset, batch_size: int = 256) -> np.ndarray:
    """The trunk's output for every sample, in order, as fp16 (N, ...); NaN rows for unreadable files."""
    was_training = trunk.training
    trunk.eval()
    device = next(trunk.parameters()).device
    rows: list[np.ndarray] = []
    loader = DataLoader(
        _Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_skip_none
    )
    dim = None
    filled = 0
    for batch in loader:
        if batch is None:
            continue
        index, x = batch
        out = trunk(x.to(device)).float().cpu().numpy().astype(np.float16)
        dim, shape = out.shape[1], out.shape[1:]
        for i, row in zip(index.tolist(), out, strict=True):
            while filled < i:  # samples skipped as unreadable
                rows.append(None)
                filled += 1
            rows.append(row)
            filled += 1
    trunk.train(was_training)
    if dim is None:
        raise RuntimeError("no readable image to compute features from")
    rows += [None] * (len(dataset) - len(rows))
    empty = np.full(shape, np.nan, dtype=np.float16)
    return np.stack([empty if r is None else r for r in rows])


def compute_views(trunk, dataset: Dataset, batch_size: int, views: int, seed: int) -> np.ndarray:
    """`views` passes of compute_features, each under its own seed (the transform's random draws)."""
    if views == 1:
        return compute_features(trunk, dataset, batch_size)
    passes = []
    state = torch.random.get_rng_state()
    for v in range(views):
        torch.manual_seed(seed * 7919 + v)
        passes.append(compute_features(trunk, dataset, batch_size))
    torch.random.set_rng_state(state)
    return np.concatenate(passes)


class _Indexed(Dataset):
    """(index, image) pairs, so unreadable samples (None) keep their place."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (i, item[0])


class FeatureDataset(Dataset):
    """A split's cached features with the split's own targets, in the split's order.

    With `views` > 1 the array holds that many augmented passes over the split, one after the other
    (finetune.cache_views): each time a sample is read, one of its views is drawn at random (from the
    global RNG, which the module reseeds every epoch, so runs repeat).
    """

    def __init__(self, features: np.ndarray, base: Dataset, views: int = 1):
        self.features, self.base, self.views = features, base, views
        self.n = len(features) // views

    def __len__(self) -> int:
        return self.n

    def __getattr__(self, name):  # labels, targets, ... of the image dataset (e.g. data.balance=sampler)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, i: int):
        view = int(torch.randint(self.views, ())) if self.views > 1 else 0
        row = torch.from_numpy(np.asarray(self.features[view * self.n + i], dtype=np.float32))
        if torch.isnan(row).any():  # an unreadable image: skipped like the image path skips it
            return None
        return row, self.base.target(i)

    def __getitems__(self, indices: list[int]):
        """A whole batch in one read (the DataLoader's batched fetch): one gather, one fp32 conversion,
        instead of a row and a collate per sample. Unreadable images are skipped as in __getitem__."""
        index = np.asarray(indices, dtype=np.int64)
        if self.views > 1:
            index = index + self.n * torch.randint(self.views, (len(index),)).numpy()
        rows = torch.from_numpy(np.asarray(self.features[index], dtype=np.float32))
        readable = ~torch.isnan(rows.flatten(1)).any(1)
        if not readable.all():
            rows, indices = (
                rows[readable],
                [i for i, ok in zip(indices, readable.tolist(), strict=True) if ok],
            )
            if not indices:
                warnings.warn(
                    f"skipping a batch: all {len(index)} of its images were unreadable", stacklevel=2
                )
                return None
        labels = getattr(self.base, "labels", None)
        if labels is not None and not hasattr(self.base, "targets"):  # one class per image: one gather
            targets = torch.as_tensor(
                np.asarray(labels)[np.asarray(indices, dtype=np.int64)], dtype=torch.int64
            )
        else:  # task datasets: {head: target} per sample
            targets = default_collate([self.base.target(i) for i in indices])
        return Collated((rows, targets))


class PrefixSplit:
    """A backbone cut after its frozen bottom: `prefix(x)` (frozen, cached) and `rest(a)` (trained).

    `rest(prefix(x)) == backbone(x)`. Known for the timm EfficientNet / MobileNet family (stem, blocks,
    head conv; EfficientNet-Lite included) and torchvision ResNets; other backbones get no prefix cache.
    """

    def __init__(self, backbone, steps: list[tuple[str, torch.nn.Module]], cut: int, tail):
        self.backbone, self.cut = backbone, cut
        self.names = [name for name, _ in steps[: cut + 1]]
        self.prefix = torch.nn.Sequential(*[m for _, m in steps[: cut + 1]])
        self.later = [m for _, m in steps[cut + 1 :]]
        self.tail = tail

    def rest(self, a: torch.Tensor) -> torch.Tensor:
        for module in self.later:
            a = module(a)
        return self.tail(a).flatten(1)


def backbone_steps(backbone) -> tuple[list[tuple[str, torch.nn.Module]], object] | None:
    """The body's forward as (name, module) steps run in order, and the tail after them; None if unknown."""
    body = backbone.body
    if all(hasattr(body, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        steps = [("conv_stem", body.conv_stem), ("bn1", body.bn1)]
        steps += [(f"blocks.{i}", block) for i, block in enumerate(body.blocks)]
        return steps, lambda a: body.forward_head(body.bn2(body.conv_head(a)))
    if all(hasattr(body, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer4", "avgpool", "fc")):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return [(n, getattr(body, n)) for n in names], lambda a: body.fc(body.avgpool(a))
    return None


def prefix_split(backbone, frozen: set[int]) -> PrefixSplit | None:
    """The longest run of steps from the input whose parameters all sit in `frozen` groups (not all steps)."""
    known = backbone_steps(backbone)
    if known is None or not frozen:
        return None
    steps, tail = known
    frozen_params = {n for g in frozen for n in backbone.groups[g].param_names}
    cut = -1
    for i, (name, module) in enumerate(steps[:-1]):
        own = {f"body.{name}.{p}" for p, _ in module.named_parameters()}
        if not own <= frozen_params:
            break
        cut = i
    while cut >= 0 and not any(True for _ in steps[cut][1].parameters()):
        cut -= 1  # end on a layer with weights (a trailing ReLU/pool gains nothing)
    return PrefixSplit(backbone, steps, cut, tail) if cut >= 0 else None


def frozen_until(schedule, max_epochs: int | None) -> int | None:
    """The first epoch whose frozen set differs from epoch 0's, or None if it never does in the run.

    A run without a bound on its epochs (max_epochs null, or -1 for Lightning's endless run) is searched
    over a long horizon: its schedule is epoch-based.
    """
    frozen = schedule.frozen_groups(0)
    bounded = max_epochs is not None and int(max_epochs) >= 0
    horizon = int(max_epochs) if bounded else (10_000 if schedule.unfreezes else 1)
    return next((e for e in range(1, horizon) if schedule.frozen_groups(e) != frozen), None)


def random_in_training(module: torch.nn.Module) -> bool:
    """Dropout, timm's DropPath or torchvision's StochasticDepth with a non-zero rate."""
    name = type(module).__name__
    if isinstance(module, torch.nn.modules.dropout._DropoutNd) or name in (
        "DropPath",
        "StochasticDepth",
        "DropBlock2d",
    ):
        rate = next((getattr(module, a) for a in ("p", "drop_prob", "drop_rate") if hasattr(module, a)), 1.0)
        return bool(rate)
    return False


def cache_applies(model, cfg, distributed: bool = False) -> str | None:
    """None when the cache is exact for this run (or for its opening frozen epochs); otherwise why not."""
    schedule = model.freeze_schedule
    frozen = schedule.frozen_groups(0)
    until = frozen_until(schedule, cfg.trainer.get("max_epochs"))
    if not frozen:
        return f"finetune={cfg.finetune.name} freezes no layer at the start"
    everything = frozen == set(range(schedule.num_groups))
    split = None if everything else prefix_split(model.backbone, frozen)
    if until is not None:  # cached for the opening frozen epochs only, then the images again
        if not everything:
            return f"finetune={cfg.finetune.name} starts with part of the backbone frozen, then changes it"
        if distributed:
            return (f"finetune={cfg.finetune.name} under DDP: the layers it unfreezes later must take part in "
                    "every step from the start")  # fmt: skip
    elif not everything and split is None:
        return f"the frozen groups of {model.hparams.model['backbone']} do not start at its input (or its layers are not a known chain)"
    trunk = model.backbone if split is None else split.prefix  # the layers the cache would stand in for
    random_layers = sorted({type(m).__name__ for m in trunk.modules() if random_in_training(m)})
    if random_layers:  # live frozen layers stay in training mode (only BatchNorm is frozen): these draw
        return f"the frozen layers contain {', '.join(random_layers)}, which is random in training"
    if schedule.soft_freeze is True:
        return "finetune.soft_freeze=true keeps the frozen layers trainable"
    if schedule.train_bn:
        return "finetune.train_bn=true trains the backbone's BatchNorm"
    views = int(cfg.finetune.get("cache_views") or 1)
    if cfg.augment.name != "none" and views < 2:
        return (f"augment={cfg.augment.name} is random (cache K augmented views of each training image with "
                "finetune.cache_views=K, K >= 2)")  # fmt: skip
    if cfg.augment.get("mixup_alpha") or cfg.augment.get("cutmix_alpha") or cfg.augment.get("jsd"):
        return "MixUp, CutMix and AugMix-JSD combine whole images within a batch"
    if getattr(model, "teacher", None) is not None:
        return "distillation needs the images for the teacher"
    if cfg.model.get("compile"):
        return "model.compile=true"
    return None


def attach_feature_cache(
    model, datamodule, cfg, device: torch.device | str = "cpu", trainer=None, resumed_epoch: int = 0
) -> bool:
    """Swap the datamodule's splits for cached backbone features where exact; True when it did.

    `finetune.cache_features`: auto = wherever exact (logged), true = required (refused with the
    reason where it is not exact), false = never. The frozen layers run on `device` (the trainer's);
    under DDP every rank computes the cache for itself (or reads it from `finetune.cache_dir`).

    A schedule that opens with the whole backbone frozen and unfreezes it later (freeze_unfreeze,
    gradual) gets the cache for those opening epochs only (under auto, from two such epochs or with a
    cache_dir: one frozen epoch costs what the cache build does): the datamodule serves the cached train and
    val features while the epoch is below the unfreeze point and the images from then on, and the
    trainer reloads its loaders at every epoch so that the switch happens (`trainer` is needed). A run
    resumed from a checkpoint saved at or after the unfreeze point (`resumed_epoch`) needs no cache.
    """
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from visiontune.errors import UserError

    setting = cfg.finetune.get("cache_features", "auto")
    if setting is False:
        return False
    distributed = trainer is not None and not isinstance(trainer.strategy, SingleDeviceStrategy)
    why_not = cache_applies(model, cfg, distributed)
    if why_not:
        if setting is True:
            raise UserError(
                f"finetune.cache_features=true is not exact here: {why_not}. Use cache_features=auto"
            )
        return False
    until = frozen_until(model.freeze_schedule, cfg.trainer.get("max_epochs"))
    if until is not None and (trainer is None or resumed_epoch >= until):
        return False
    if until == 1 and setting == "auto" and not cfg.finetune.get("cache_dir"):
        log.info("finetune.cache_features=auto: not cached, since building the cache costs what its one frozen "
                 "epoch would save (it pays from two frozen epochs, or with finetune.cache_dir kept for later "
                 "runs; cache_features=true caches anyway)")  # fmt: skip
        return False
    datamodule.setup("fit")
    backbone = model.backbone
    frozen = model.freeze_schedule.frozen_groups(0)
    split = None if frozen == set(range(model.freeze_schedule.num_groups)) else prefix_split(backbone, frozen)
    trunk = backbone if split is None else split.prefix
    what = "features" if split is None else f"activations after {split.names[-1]}"
    store = ArrayStore(cfg.finetune.get("cache_dir"), "feature cache")
    weights = weights_hash(backbone)
    names = list(schedule_names(model)) + ([f"cut:{split.names[-1]}"] if split else [])
    for part in ("train_set", "val_set") if until is not None else ("train_set", "val_set", "test_set"):
        dataset = getattr(datamodule, part)
        if dataset is None or isinstance(dataset, FeatureDataset) or part in datamodule.feature_sets:
            continue
        views = (
            int(cfg.finetune.get("cache_views") or 1)
            if part == "train_set" and cfg.augment.name != "none"
            else 1
        )
        key = cache_key(model.hparams.model["backbone"], weights, names + ([f"views:{views}:{cfg.seed}"] if views > 1 else []),
                        dataset.transform, data_fingerprint(dataset))  # fmt: skip
        features = store.load(key, np.float16)
        shape = "x".join(str(d) for d in (features.shape if features is not None else ()))
        if features is None:
            home = next(trunk.parameters()).device
            features = compute_views(trunk.to(device), dataset, int(cfg.data.batch_size), views, cfg.seed)
            trunk.to(home)
            store.save(key, features)
            where = f"stored in {store.root}" if store.root else "in memory"
            shape = "x".join(str(d) for d in features.shape)
            log.info("feature cache: %s, %s %s computed (%s)", part[:-4], shape, what, where)
        else:
            log.info("feature cache: %s, %s %s read from %s", part[:-4], shape, what, store.root)
        if until is None:
            setattr(datamodule, part, FeatureDataset(features, dataset, views))
        else:
            datamodule.feature_sets[part] = FeatureDataset(features, dataset, views)
    if until is not None:
        datamodule.features_until = until
        # reload the loaders every epoch so that they switch to images at `until`; the datamodule puts
        # the user's setting back once the images are served (see ImageDataModule._fit_split)
        datamodule.reload_setting = trainer.reload_dataloaders_every_n_epochs
        trainer.reload_dataloaders_every_n_epochs = 1
        log.info("finetune.cache_features=%s: epochs 0-%d (backbone frozen) train the head on cached features; "
                 "the images return at epoch %d, when the backbone unfreezes", setting, until - 1, until)  # fmt: skip
        return True
    model.set_prefix_split(split)
    # the frozen set never changes, so the frozen layers are hard-frozen even under DDP: the layers the
    # cache replaced get no gradient, which a soft freeze (trainable at LR 0) would make DDP wait for
    model.freeze_schedule.soft_freeze = False
    if split is None:
        log.info("finetune.cache_features=%s: the frozen backbone runs once per image; the head trains on its features",
                 setting)  # fmt: skip
    else:
        log.info("finetune.cache_features=%s: the frozen layers up to %s run once per image; the rest trains on "
                 "their output", setting, split.names[-1])  # fmt: skip
    return True


def schedule_names(model) -> list[str]:
    return [model.freeze_schedule.group_names[g] for g in sorted(model.freeze_schedule.frozen_groups(0))]
