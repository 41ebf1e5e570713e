"""The frozen-feature cache (`finetune.cache_features=auto|true|false`).

While layers at the bottom of the backbone are frozen and the images reach them through a
deterministic transform (or K cached augmented views, `finetune.cache_views`), their output for an
image never changes. It is computed once per split (batched, under inference mode, stored as fp16),
and the layers above train on it. Three cases:

- the whole backbone frozen for the whole run (finetune=linear_probe): the backbone's features are
  cached, and the head trains on them; an epoch costs a few matrix products;
- the bottom groups frozen for the whole run (finetune=freeze_groups from the first group, on a
  backbone whose forward pass is known step by step, `Backbone.steps`): the activations after the
  last frozen step are cached, and the rest of the backbone trains from them (`Backbone.forward_from`);
- the whole backbone frozen for the opening epochs, then unfrozen (freeze_unfreeze, gradual): the
  features are cached for those epochs only, and the images return when the backbone unfreezes.

`plan_feature_cache` decides whether the cache is exact for a run; `FeatureCache.build` computes it;
the `FeatureCache` callback then has the datamodule serve it in place of the images while it holds,
as `Activations` batches that tell the model what they are.

The cache key covers everything the features depend on: the backbone and a hash of its weights, the
frozen groups, the transform, and the data (file names, sizes and mtimes, or the in-memory images).
With `finetune.cache_dir` set, the features are also kept on disk (a memory-mapped .npy beside a JSON
with its key, shape and checksum), so later runs (a sweep's trials) skip the frozen layers entirely; a
file whose key, size or checksum does not match (bytes damaged in place) is rebuilt with a warning that
names it, and a cache dir that cannot be written falls back to memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from visiontune.data.cache import ArrayStore, files_fingerprint
from visiontune.data.files import Collated, collate_skip_none
from visiontune.data.indexed import Indexed
from visiontune.data.workers import ignore_interrupts
from visiontune.data.wrapped import WrappedDataset
from visiontune.errors import UserError
from visiontune.models.backbones import Activations

log = logging.getLogger("visiontune")


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
    if hasattr(dataset, "fingerprint"):  # a shard split: the sha256 of its LitData index
        digest.update(f"shards:{dataset.fingerprint}".encode())
    elif hasattr(dataset, "paths"):
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
        Indexed(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        collate_fn=collate_skip_none,
        worker_init_fn=ignore_interrupts,
    )
    dim = None
    filled = 0
    for batch in loader:
        if batch is None:
            continue
        index, x = batch[0], batch[1]  # (index, image, target)
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


class FeatureDataset(WrappedDataset):
    """A split's cached activations with the split's own targets, in the split's order.

    A loader's batches (`__getitems__`) are `(Activations(rows, start), targets)`: the activations that
    enter the backbone's step `start` (None: its output, the features). A single item is the plain
    `(row, target)`.

    With `views` > 1 the array holds that many augmented passes over the split, one after the other
    (finetune.cache_views): each time a sample is read, one of its views is drawn at random (from the
    global RNG, which the module reseeds every epoch, so runs repeat).
    """

    def __init__(self, features: np.ndarray, base: Dataset, views: int = 1, start: int | None = None):
        self.features, self.base, self.views, self.start = features, base, views, start
        self.n = len(features) // views

    def __len__(self) -> int:
        return self.n

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
        return Collated((Activations(rows, self.start), targets))


class PrefixSplit:
    """A backbone cut after its frozen bottom: `prefix(x)` (its first `start` steps: frozen, cached) and
    `rest(a)` (the steps from `start` on: trained), with `rest(prefix(x)) == backbone(x)`.

    The steps are the backbone's own (`Backbone.steps`): a family whose forward pass is not known step
    by step gets no prefix cache.
    """

    def __init__(self, backbone, start: int):
        self.backbone, self.start = backbone, start
        steps = backbone.steps()[:start]
        self.names = [name for name, _ in steps]
        self.prefix = torch.nn.Sequential(*[m for _, m in steps])

    def rest(self, a: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_from(a, self.start)


def prefix_split(backbone, frozen: set[int]) -> PrefixSplit | None:
    """The longest run of steps from the input whose parameters all sit in `frozen` groups (not all steps)."""
    steps = backbone.steps()
    if not steps or not frozen:
        return None
    frozen_params = {n for g in frozen for n in backbone.groups[g].param_names}
    cut = -1
    for i, (name, module) in enumerate(steps[:-1]):
        own = {f"body.{name}.{p}" for p, _ in module.named_parameters()}
        if not own <= frozen_params:
            break
        cut = i
    while cut >= 0 and not any(True for _ in steps[cut][1].parameters()):
        cut -= 1  # end on a layer with weights (a trailing ReLU/pool gains nothing)
    return PrefixSplit(backbone, cut + 1) if cut >= 0 else None


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


def plan_feature_cache(model, cfg, resumed_epoch: int = 0) -> FeatureCache | None:
    """The run's feature cache, to build (`FeatureCache.build`), or None where the run reads images.

    `finetune.cache_features`: auto = wherever exact, true = required (refused with the reason where it
    is not exact), false = never. A schedule that opens with the whole backbone frozen and unfreezes it
    later (freeze_unfreeze, gradual) gets the cache for those opening epochs only; under auto from two
    such epochs or with a cache_dir (one frozen epoch costs what the cache build does). A run resumed
    from a checkpoint saved at or after the unfreeze point (`resumed_epoch`) needs no cache. Whether
    DDP rules it out is known once the trainer is (see `build`).
    """
    setting = cfg.finetune.get("cache_features", "auto")
    if setting is False:
        return None
    why_not = cache_applies(model, cfg)
    if why_not:
        if setting is True:
            raise UserError(
                f"finetune.cache_features=true is not exact here: {why_not}. Use cache_features=auto"
            )
        return None
    schedule = model.freeze_schedule
    until = frozen_until(schedule, cfg.trainer.get("max_epochs"))
    if until is not None and resumed_epoch >= until:
        return None
    if until == 1 and setting == "auto" and not cfg.finetune.get("cache_dir"):
        log.info("finetune.cache_features=auto: not cached, since building the cache costs what its one frozen "
                 "epoch would save (it pays from two frozen epochs, or with finetune.cache_dir kept for later "
                 "runs; cache_features=true caches anyway)")  # fmt: skip
        return None
    frozen = schedule.frozen_groups(0)
    split = None if frozen == set(range(schedule.num_groups)) else prefix_split(model.backbone, frozen)
    return FeatureCache(setting, split, until)


class FeatureCache(L.Callback):
    """The switch between cached activations and images, as a Lightning callback.

    Made by `plan_feature_cache`, filled by `build`. While the layers it stands in for are frozen, the
    datamodule's loaders read its `Activations` in place of the images (`ImageDataModule.serve_instead`):
    for the whole run (`until` None, the test split included) or for the epochs before `until`. For the
    switch at `until`, the trainer reloads its loaders every epoch until both serve images again, then
    gets its own `reload_dataloaders_every_n_epochs` back.

    In the whole-run case the cached layers never run in training, so they must be hard-frozen even
    under DDP: the run's `ApplyFreeze` is told so (`hard_freeze`).
    """

    def __init__(self, setting, split: PrefixSplit | None, until: int | None):
        self.setting, self.split, self.until = setting, split, until
        self.features: dict[str, FeatureDataset] = {}  # empty until built (and where DDP ruled it out)
        self.seconds = 0.0  # the time `build` took
        self.datamodule = None
        self._trainer = None
        self._user_reload: int | None = None  # the trainer's own reload setting, while it is overridden

    @property
    def hard_freeze(self) -> bool:
        """The frozen set never changes and the cached layers never run: no soft freeze (LR 0) for them."""
        return self.until is None

    def build(
        self, model, datamodule, cfg, device: torch.device | str = "cpu", distributed: bool = False
    ) -> bool:
        """Compute each split's activations (or read them from `finetune.cache_dir`); True when cached.

        The frozen layers run on `device` (the trainer's); under DDP every rank computes the cache for
        itself (or reads it from the cache dir). The opening-epochs cache is ruled out under DDP (the
        layers it unfreezes later must take part in every step): refused under cache_features=true,
        skipped (False) under auto.
        """
        if distributed and (why_not := cache_applies(model, cfg, distributed=True)):
            if self.setting is True:
                raise UserError(
                    f"finetune.cache_features=true is not exact here: {why_not}. Use cache_features=auto"
                )
            return False
        begin = time.perf_counter()
        datamodule.setup("fit")
        self.datamodule = datamodule
        split = self.split
        trunk = model.backbone if split is None else split.prefix
        what = "features" if split is None else f"activations after {split.names[-1]}"
        store = ArrayStore(cfg.finetune.get("cache_dir"), "feature cache")
        weights = weights_hash(model.backbone)
        names = list(schedule_names(model)) + ([f"cut:{split.names[-1]}"] if split else [])
        start = None if split is None else split.start
        augmented_views = int(cfg.finetune.get("cache_views") or 1) if cfg.augment.name != "none" else 1
        parts = ("train_set", "val_set") if self.until is not None else ("train_set", "val_set", "test_set")
        for part in parts:
            dataset = getattr(datamodule, part)
            if dataset is None:
                continue
            views = augmented_views if part == "train_set" else 1
            drawn = [f"views:{views}:{cfg.seed}"] if views > 1 else []
            key = cache_key(
                model.hparams.model["backbone"],
                weights,
                names + drawn,
                dataset.transform,
                data_fingerprint(dataset),
            )
            features = store.load(key, np.float16)
            if features is None:
                home = next(trunk.parameters()).device
                features = compute_views(trunk.to(device), dataset, int(cfg.data.batch_size), views, cfg.seed)
                trunk.to(home)
                store.save(key, features)
                where = f"stored in {store.root}" if store.root else "in memory"
                log.info("feature cache: %s, %s %s computed (%s)", part[:-4], _shape(features), what, where)
            else:
                log.info(
                    "feature cache: %s, %s %s read from %s", part[:-4], _shape(features), what, store.root
                )
            self.features[part] = FeatureDataset(features, dataset, views, start)
        self.seconds = time.perf_counter() - begin
        if self.until is not None:
            log.info("finetune.cache_features=%s: epochs 0-%d (backbone frozen) train the head on cached features; "
                     "the images return at epoch %d, when the backbone unfreezes", self.setting, self.until - 1,
                     self.until)  # fmt: skip
        elif split is None:
            log.info("finetune.cache_features=%s: the frozen backbone runs once per image; the head trains on its features",
                     self.setting)  # fmt: skip
        else:
            log.info("finetune.cache_features=%s: the frozen layers up to %s run once per image; the rest trains on "
                     "their output", self.setting, split.names[-1])  # fmt: skip
        return True

    def serve(self, part: str) -> Dataset | None:
        """What the loaders read for `part` now: its cached activations while they hold, else None (images)."""
        if self.until is not None and self._trainer is not None and self._trainer.current_epoch >= self.until:
            return None
        return self.features.get(part)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.features:
            return
        self._trainer = trainer
        self.datamodule.serve_instead(self.serve)
        if stage == "fit" and self.until is not None and self._user_reload is None:
            # reload the loaders every epoch, so that they switch to the images at `until`
            self._user_reload = trainer.reload_dataloaders_every_n_epochs
            trainer.reload_dataloaders_every_n_epochs = 1

    def on_validation_start(self, trainer, pl_module) -> None:
        # both loaders read images once validation reloads at `until` (the train loader switched first)
        if (
            self._user_reload is not None
            and not trainer.sanity_checking
            and trainer.current_epoch >= self.until
        ):
            self._put_back(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.features:
            self.datamodule.serve_instead(None)
        self._put_back(trainer)

    def _put_back(self, trainer) -> None:
        if self._user_reload is not None:
            trainer.reload_dataloaders_every_n_epochs, self._user_reload = self._user_reload, None


def _shape(features: np.ndarray) -> str:
    return "x".join(str(d) for d in features.shape)


def schedule_names(model) -> list[str]:
    return [model.freeze_schedule.group_names[g] for g in sorted(model.freeze_schedule.frozen_groups(0))]
