"""The config schema: every key of the train config, its type and a one-line doc; and the rules that
span several keys.

The values live in the YAML files of conf/ (what a user reads and edits); the dataclasses below say
what each key is: its type, its range where a type cannot say it, and one line on what it does.
`validate_config` checks a composed config against them once, before anything runs. A bad value is
a one-line UserError that names the key, the value and what is allowed, e.g.
`invalid config value data.strict=2: must be true or false`; a key that no dataclass declares is
refused too. `visiontune-train --help` prints the docs (`train_help`).

Why our own check of the composed config, and not Hydra's schema matching (the dataclasses stored in
Hydra's ConfigStore and named in each group's defaults list)? OmegaConf converts where it should
refuse: `data.strict=2` and `data.strict=yes` both become true, and `data.batch_size='64'` becomes
64. Its errors come out of Hydra's reporter, before our code runs, as several lines and exit code 1.
And a group's schema puts every key of the group into every option (augment=none would carry
AugMix's keys), so the composed configs would change. Checking the same kind of dataclasses against
the composed config is strict, leaves the composed values exactly as the YAML wrote them, and ends
in one line and exit code 2 through `cli.run_cli`.

Checks that need the backbone (group indices against its real number of groups) happen later, where
the backbone is known.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from visiontune.data.checks import BALANCE, CACHE_MODES
from visiontune.data.datamodule import FILE_DATASETS, SHARDS
from visiontune.data.standard import STANDARD
from visiontune.data.transforms import PRESETS
from visiontune.errors import UserError, one_line
from visiontune.evaluation.adapt import METHODS as ADAPT_METHODS
from visiontune.evaluation.adapt import OPTIMIZERS as ADAPT_OPTIMIZERS
from visiontune.evaluation.adapt import RESETS as ADAPT_RESETS
from visiontune.models.heads import TASKS, WEIGHTINGS, check_heads
from visiontune.training.finetune import SCHEDULES as FREEZE_SCHEDULES
from visiontune.training.module import OPTIMIZERS
from visiontune.training.schedules import SCHEDULES

log = logging.getLogger("visiontune")

ABSENT = object()
# What the value must be, when it is not; None when it is fine. The config gives context (`fold < folds`).
Check = Callable[[Any, DictConfig], str | None]


def lightning_precisions() -> tuple:
    """Every `precision` the installed Lightning accepts (its own list, when it exposes one)."""
    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:  # an older or newer Lightning: the values of Lightning 2.x
        return (64, 32, 16, "64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true",
                "16-mixed", "bf16-mixed", "transformer-engine", "transformer-engine-float16")  # fmt: skip

    def flatten(t) -> tuple:
        args = get_args(t)
        return tuple(v for a in args for v in flatten(a)) if args else (t,)

    return flatten(_PRECISION_INPUT)


# -- the value checks that a type cannot express (each gets the value once its type is right)
SLICE = re.compile(r"\s*-?\d*\s*:\s*-?\d*\s*|\s*-?\d+\s*")


def group_selection(value, cfg) -> str | None:
    """finetune.groups: an index, a list of indices, or a "start:stop" slice string."""
    return None if not isinstance(value, str) or SLICE.fullmatch(value) else "a slice"


def text(value, cfg) -> str | None:
    return None if value.strip() else "a non-empty string"


def byte_size(value, cfg) -> str | None:
    from visiontune.data.shards import parse_bytes

    try:
        return None if parse_bytes(value) > 0 else "a size above 0"
    except UserError:
        return "a number of bytes or a size like 500MB, 20GB"


def regex(value, cfg) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"a valid regular expression ({exc})"
    return None


def devices(value, cfg) -> str | None:
    ok = (
        (is_int(value) and (value >= 1 or value == -1))
        or (isinstance(value, str) and value.strip() not in ("", "0"))
        or (isinstance(value, list) and len(value) > 0 and all(v >= 0 for v in value))
    )
    return None if ok else "a count >= 1, -1 (all), 'auto', or a list of device indices"


def pair(value, cfg) -> str | None:
    return None if len(value) == 2 else "a list of two numbers"


def checkpoint_file(value, cfg) -> str | None:
    """A local checkpoint that exists (URLs are checked when they are read)."""
    if not value.strip():
        return "a checkpoint path (<run dir>/checkpoints/best.ckpt)"
    if "://" in value or Path(value).expanduser().is_file():
        return None
    return "an existing checkpoint file (<run dir>/checkpoints/best.ckpt); none is there"


def dataset(value, cfg) -> str | None:
    names = (*STANDARD, *FILE_DATASETS, SHARDS)
    return None if value in names else "one of " + ", ".join(names)


# the Trainer arguments that the run builder sets itself
SET_BY_THE_RUN = ("default_root_dir", "callbacks", "logger", "plugins", "enable_progress_bar", "enable_model_summary")  # fmt: skip


def trainer_argument(name: str) -> str | None:
    """trainer.<name> beyond the declared keys: any other lightning.Trainer argument passes through."""
    import inspect

    import lightning as L

    if name in SET_BY_THE_RUN:
        return "the run sets it itself"
    known = inspect.signature(L.Trainer.__init__).parameters
    return None if name in known else "not a lightning.Trainer argument"


# -- the schema: one dataclass per config group
def key(
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Check | None = None,
    says: str | None = None,
    required: bool = False,
) -> Any:
    """A config key: its one-line doc; the range of a number (ge, gt, le, lt); a further check of the
    value once its type is right; what the error says the value must be (default: from the type and
    range); and whether an absent key is an error (otherwise the code's default applies)."""
    bounds = (ge if ge is not None else gt, le if le is not None else lt, gt is not None, lt is not None)
    meta = {"doc": doc, "bounds": bounds, "check": check, "says": says, "required": required}
    return field(metadata=meta)


Precision = Literal[lightning_precisions()]
AutoOrBool = bool | Literal["auto"]


@dataclass
class Paths:
    """paths: where the data and the run outputs go."""

    data_dir: str = key("where the standard datasets are read from and downloaded to", check=text)
    output_dir: str = key("the run dir: checkpoints, logs, metrics.json (Hydra's run dir)", check=text)


@dataclass
class Data:
    """data: the dataset, its splits and its loaders."""

    name: str = key(
        "the dataset: fashion_mnist, mnist, cifar10, cifar100, imagefolder, csv or shards", check=dataset
    )
    root: str = key("where the data lives: a folder, a CSV file for data=csv, a URL for data=shards", check=text,
                    required=True)  # fmt: skip
    train_subset: int | None = key("N training images, a seeded stratified subset (null = all)", ge=1)
    val_fraction: float = key("share of train held out for val when there is no val split", ge=0, lt=1)
    test_fraction: float = key("imagefolder, one flat folder: the share held out for test", ge=0, lt=1)
    val_subset: int | None = key("cap on validation images, a seeded stratified subset (null = all)", ge=1)
    test_subset: int | None = key("cap on test images, a seeded stratified subset (null = all)", ge=1)
    folds: int | None = key("k-fold cross-validation: K folds of train (null = no folds)", ge=2)
    fold: int | None = key("the fold held out as val, 0..folds-1", ge=0)
    image_size: int | None = key("input size in px (null = the backbone's pretrained size)", ge=1)
    crop_pct: float | None = key(
        "eval resize to size / crop_pct, then centre crop (null = the backbone's)", gt=0, le=1
    )
    mean: list[float] | None = key("normalisation mean per channel (null = the backbone's)")
    std: list[float] | None = key("normalisation std per channel (null = the backbone's)")
    interpolation: str | None = key("resize interpolation: bilinear, bicubic, ... (null = the backbone's)")
    batch_size: int = key("images per batch (per device)", ge=1, required=True)
    num_workers: int | None = key("loader processes (null = 0 in memory, cores-1 for files)", ge=0)
    balance: Literal[BALANCE] = key(
        "sampler: classes drawn equally often; loss_weights: inverse class frequency"
    )
    strict: bool = key("bad image files are an error instead of a warning")
    min_read_fraction: float = key(
        "an epoch or the test reading a smaller share of its images (broken files) ends the run", ge=0, le=1
    )
    allow_class_mismatch: bool = key("eval and resume accept class names that differ from the checkpoint's")
    device_transforms: AutoOrBool = key("resize, augment and normalise whole batches on the device")
    cache: Literal[CACHE_MODES] = key("image files: decode and resize once, into memory or disk")
    cache_dir: str | None = key(
        "data.cache=disk arrays (null: <root>/.cache); remote shard chunks (null: ~/.cache/visiontune/shards)",
        check=text,
    )
    cache_limit: str | int | None = key(
        "data=shards, a remote root: the local cache's size limit (bytes, or e.g. 20GB)", check=byte_size
    )
    max_pixels: int | None = key(
        "images with more pixels are skipped before decoding (a pixel bomb); null = no limit",
        ge=1,
    )


@dataclass
class Head:
    """model.head: the new layers on top of the backbone."""

    dropout: float = key("dropout before the new linear layer(s)", ge=0, lt=1)
    hidden: int | None = key("width of an optional hidden layer (null = one linear layer)", ge=1)


@dataclass
class Model:
    """model: the backbone and its new head."""

    backbone: str = key("torchvision name, timm:<name>, efficientnet_lite0..2 or file:<path>@<arch>", check=text, required=True)  # fmt: skip
    pretrained: bool = key("load the backbone's pretrained weights (false = random init)")
    head: Head = key("the new head")
    label_smoothing: float = key("cross-entropy label smoothing", ge=0, lt=1)
    channels_last: bool = key("channels_last (NHWC) memory format; false = NCHW")
    compile: bool = key("torch.compile the model (refused with strategies that unfreeze later)")


def lora_target(value, cfg) -> str | None:
    patterns = [value] if isinstance(value, str) else list(value)
    if value == "auto":
        return None
    for pattern in patterns:
        if not isinstance(pattern, str):
            return "auto or a list of regexes over layer names"
        problem = regex(pattern, cfg)
        if problem:
            return problem
    return None


@dataclass
class Lora:
    """finetune.lora: the adapters of finetune=lora."""

    r: int = key("the rank of each low-rank update", ge=1)
    alpha: float = key("the update is scaled by alpha / r", gt=0)
    dropout: float = key("dropout on the adapters' input", ge=0, lt=1)
    target: str | list[str] = key(
        "auto (Linear and 1x1 conv layers, and the top group's convs) or regexes over layer names",
        check=lora_target,
        says="auto or a list of regexes over layer names",
    )


@dataclass
class Finetune:
    """finetune: the strategy, which layers train when, and the per-layer LRs."""

    name: Literal[tuple(FREEZE_SCHEDULES)] = key("the strategy", required=True)
    backbone_lr_mult: float = key("backbone LR = optimizer.lr x backbone_lr_mult x layer_decay**depth", ge=0)
    layer_decay: float = key("LR factor per group down from the top (1 = the same LR)", gt=0, le=1)
    train_bn: bool = key("frozen BatchNorm layers train their gamma/beta and update their statistics")
    unfreeze_warmup_steps: int = key("steps over which a newly unfrozen group ramps its LR up", ge=0)
    soft_freeze: AutoOrBool = key("freeze by LR 0 instead of requires_grad=False (auto = under DDP)")
    cache_features: AutoOrBool = key("run the frozen bottom layers once per image (auto = where exact)")
    cache_views: int = key("augmented views cached per image with a random augment preset", ge=1)
    cache_dir: str | None = key("keep the cached features on disk here (null = in memory)", check=text)
    unfreeze_at_epoch: int = key("freeze_unfreeze: the epoch at which the backbone unfreezes", ge=0)
    every_k_epochs: int = key("gradual: one more group unfreezes every k epochs", ge=1)
    milestones: list[int] | None = key("gradual: the epochs at which the next group unfreezes")
    groups: int | str | list[int] | None = key(
        'freeze_groups: the frozen groups; lora: the groups with no adapter (a slice "0:3", an index, a list)',
        check=group_selection,
        says='null, an integer, a list of integers, or a slice string "start:stop" like "0:3"',
    )
    pattern: str | None = key("freeze_groups, lora: a regex over the group names, as groups", check=regex)
    lora: Lora = key("lora: the rank, scaling, dropout and target layers of the adapters")


@dataclass
class Optimizer:
    """optimizer: the optimizer and its LR (the head's; the backbone groups scale it)."""

    name: Literal[OPTIMIZERS] = key("the optimizer", required=True)
    lr: float = key("the head's LR (finetune.backbone_lr_mult and layer_decay scale it)", gt=0, required=True)
    weight_decay: float = key("weight decay (not on norm and bias parameters)", ge=0)
    betas: list[float] = key("adam, adamw: the moving-average coefficients", check=pair)
    momentum: float = key("sgd: momentum", ge=0, le=1)
    nesterov: bool = key("sgd: Nesterov momentum")


@dataclass
class Scheduler:
    """scheduler: the LR schedule, after an optional linear warmup."""

    name: Literal[SCHEDULES] = key("the LR schedule after the warmup", required=True)
    warmup_epochs: int = key("linear warmup in epochs (adds up with warmup_steps)", ge=0)
    warmup_steps: int = key("linear warmup in optimizer steps", ge=0)
    min_lr_ratio: float = key("cosine: decay to min_lr_ratio x lr", ge=0, le=1)
    step_size: int = key("step: multiply the LR by gamma every step_size epochs", ge=1)
    gamma: float = key("step: the LR factor", gt=0)
    pct_start: float = key("onecycle: share of the run spent raising the LR", ge=0, le=1)
    div_factor: float = key("onecycle: the starting LR is lr / div_factor", gt=0)
    final_div_factor: float = key("onecycle: the final LR is the starting LR / final_div_factor", gt=0)
    patience: int = key("plateau: epochs without improvement before the LR drops", ge=0)
    factor: float = key("plateau: the LR factor at each drop", gt=0, lt=1)
    threshold: float = key("plateau: the smallest change that counts as an improvement", ge=0)


@dataclass
class Augment:
    """augment: the training transform preset, and batch-level mixing."""

    name: Literal[PRESETS] = key("the preset (none = the eval transform)", required=True)
    mixup_alpha: float = key("batch MixUp: blend image pairs, weight ~ Beta(alpha) (0 = off)", ge=0)
    cutmix_alpha: float = key(
        "batch CutMix: paste a box of another image, area ~ Beta(alpha) (0 = off)", ge=0
    )
    hflip: float = key("probability of a horizontal flip", ge=0, le=1)
    scale: list[float] = key("area fraction range of the random resized crop", check=pair)
    degrees: float = key("affine: rotation range in degrees (+-)", ge=0)
    translate: list[float] = key("affine: largest shift as a fraction of the size (x, y)", check=pair)
    affine_scale: list[float] = key("affine: zoom range", check=pair)
    jitter: float = key("color: brightness, contrast and saturation jitter", ge=0)
    hue: float = key("color: hue jitter", ge=0, le=0.5)
    grayscale_p: float = key("color: probability of turning the image grey", ge=0, le=1)
    blur_p: float = key("noise: probability of a Gaussian blur", ge=0, le=1)
    noise_sigma: float = key("noise: std of the pixel noise, in [0, 1] pixel units", ge=0)
    noise_p: float = key("noise: share of the images that get the noise", ge=0, le=1)
    num_ops: int = key("randaugment: random operations per image", ge=0)
    magnitude: int = key("randaugment: their strength", ge=0, le=30)
    erasing_p: float = key("random_erasing, strong: probability of erasing a rectangle", ge=0, le=1)
    severity: int = key("augmix: strength of each operation", ge=1, le=10)
    mixture_width: int = key("augmix: chains blended per image", ge=1)
    all_ops: bool = key("augmix: also the colour operations that the robustness eval tests")
    jsd: bool = key("augmix: 3 views per image and a Jensen-Shannon consistency loss (3x compute)")
    jsd_weight: float = key("augmix: weight of the Jensen-Shannon term", ge=0)


@dataclass
class Trainer:
    """trainer: lightning.Trainer arguments, passed through as they are (any other one is accepted too)."""

    accelerator: str = key("cpu, gpu, cuda, mps, tpu or auto", check=text)
    devices: int | str | list[int] = key(
        "a count, -1 (all), auto, or a list of device indices", check=devices
    )
    precision: Precision = key("32, 16-mixed, bf16-mixed, ... (Lightning's precision)")
    max_epochs: int | None = key(
        "epochs to train (null only with trainer.max_steps > 0)", ge=1, required=True
    )
    max_steps: int = key("stop after this many optimizer steps (-1 = no limit)", ge=-1)
    log_every_n_steps: int = key("log the training metrics every N steps", ge=1)
    num_sanity_val_steps: int = key("validation batches checked before training (-1 = all)", ge=-1)
    gradient_clip_val: float | None = key("clip the gradients at this value (null = no clipping)", ge=0)
    gradient_clip_algorithm: Literal["norm", "value"] = key("clip the gradients' norm or their values")
    accumulate_grad_batches: int = key("batches whose gradients add up into one optimizer step", ge=1)
    deterministic: bool | Literal["warn"] = key("deterministic algorithms only (warn = warn where none is)")
    strategy: str = key("auto, ddp, fsdp, ... (Lightning's strategy)", check=text)
    sync_batchnorm: bool = key("DDP: BatchNorm statistics over all processes")
    num_nodes: int = key("machines taking part", ge=1)
    fast_dev_run: bool | int = key("run N (true = 1) batches of each stage, a quick check", ge=0)
    limit_train_batches: float = key("training batches per epoch: a count, or a share (1.0 = all)", ge=0)
    limit_val_batches: float = key("validation batches: a count, or a share (1.0 = all)", ge=0)
    limit_test_batches: float = key("test batches: a count, or a share (1.0 = all)", ge=0)
    overfit_batches: float = key("train and validate on these few training batches", ge=0)
    profiler: str | None = key("simple, advanced or pytorch (null = none)")


@dataclass
class Logger:
    """logger: where the metrics go; every logger writes inside the run dir."""

    csv: bool = key("<run>/csv/metrics.csv")
    tensorboard: bool = key("<run>/tensorboard")
    mlflow: dict | None = key(
        "MLFlowLogger arguments (null = off; no tracking_uri = <run>/mlflow.db, SQLite)"
    )
    wandb: dict | None = key("WandbLogger arguments, e.g. {project: p, offline: true} (null = off)")


@dataclass
class CheckpointCallback:
    """callbacks.checkpoint: what picks best.ckpt."""

    monitor: str = key(
        "the metric that picks best.ckpt (and that metrics.json and sweeps follow)", check=text
    )
    mode: Literal["max", "min"] = key("which way the monitor is better")


@dataclass
class Progress:
    """callbacks.progress: the progress bar on a terminal."""

    refresh_rate: int = key("redraw the progress bar every N batches", ge=0)


@dataclass
class Callbacks:
    """callbacks: checkpointing, the progress bar and the optional Lightning callbacks."""

    checkpoint: CheckpointCallback = key("the best checkpoint")
    progress: Progress = key("the progress bar")
    lr_monitor: bool = key("log each optimizer group's LR (needs a logger)")
    curves: bool = key("<run>/curves.png: losses, metrics and each group's LR by epoch, redrawn every epoch")
    early_stopping: dict | None = key(
        "EarlyStopping arguments, e.g. {monitor: val/acc, mode: max, patience: 3}"
    )
    ema: dict | None = key("an EMA of the weights for val, test and checkpoints, e.g. {decay: 0.999}")


@dataclass
class Task:
    """task: what the model predicts per image."""

    name: Literal[TASKS] = key(
        "one class per image, a set of labels (multilabel), or several heads (multitask)"
    )
    label_sep: str = key("multilabel: the separator of the labels in one CSV cell", check=text)
    threshold: float | Literal["auto"] = key(
        "multilabel: predict a label at this probability (auto = tuned per label on val)",
        gt=0,
        lt=1,
        says="a number in (0, 1), or auto",
    )
    heads: list | None = key("multitask: the heads, each {name, column, kind, weight}", check=check_heads)
    loss_weighting: Literal[WEIGHTINGS] = key("multitask: fixed weights, or uncertainty (learned weights)")
    pos_weight: bool = key("multilabel: BCE pos_weight = negatives / positives of each label")


@dataclass
class Distill:
    """distill: knowledge distillation from a trained checkpoint."""

    teacher: str | None = key(
        "a trained checkpoint, same classes, any backbone (null = off)", check=checkpoint_file
    )
    alpha: float = key(
        "loss = alpha x KL(student/T, teacher/T) x T^2 + (1 - alpha) x cross-entropy", ge=0, le=1
    )
    temperature: float = key("the softmax temperature T of that KL term", gt=0)


@dataclass
class Tune:
    """tune: Lightning's LR range test before fit."""

    lr_find: bool = key("run it; its suggestion replaces optimizer.lr (<run>/lr_find.png)")
    min_lr: float = key("the lowest LR it tries", gt=0)
    max_lr: float = key("the highest LR it tries", gt=0)
    num_training: int = key("the steps it takes", ge=1)


@dataclass
class TrainConfig:
    """The train config (conf/train.yaml and its groups)."""

    task_name: str = key("names the run dir: outputs/<task_name>/<date>_<time>", check=text)
    seed: int = key("seeds Python, NumPy, torch and the loader workers", ge=0, le=2**32 - 1)
    ckpt_path: str | None = key("resume from this checkpoint, e.g. <run>/checkpoints/last.ckpt")
    restart: bool = key("move the checkpoints of a used run dir aside and start fresh")
    test: bool = key("test the best checkpoint after fit")
    optimized_metric: str | None = key("the metric that train returns, for sweeps (null = the monitor)")
    max_cpu_hours: float | None = key("refuse a CPU run estimated longer than this (null = no limit)", gt=0)
    paths: Paths = key("where things go")
    data: Data = key("the dataset")
    model: Model = key("the backbone and head")
    finetune: Finetune = key("the fine-tuning strategy")
    optimizer: Optimizer = key("the optimizer")
    scheduler: Scheduler = key("the LR schedule")
    augment: Augment = key("the augmentation")
    trainer: Trainer = key("the Lightning Trainer")
    logger: Logger = key("the loggers")
    callbacks: Callbacks = key("the callbacks")
    task: Task = key("the task")
    distill: Distill = key("knowledge distillation")
    tune: Tune = key("the LR range test")
    optuna_trial: dict | None = key("set by the Optuna sweeper for each trial (storage, study_name, number)")


# Open groups: a key they do not declare is checked by this function instead (None = fine).
OPEN = {"trainer": trainer_argument}


# -- checking a value against its type
def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def members(tp) -> tuple:
    return get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def fits(value, tp) -> bool:
    """Whether `value` (plain Python) is of type `tp`, strictly: no conversions (2 is not a bool)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, t) for t in get_args(tp))
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return is_int(value)
    if tp is float:
        return is_number(value)
    if tp is str:
        return isinstance(value, str)
    if tp is list or origin is list:
        return isinstance(value, list) and all(fits(v, (get_args(tp) or (Any,))[0]) for v in value)
    if tp is dict or origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    raise TypeError(f"the schema has a type it cannot check: {tp}")


def interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def within(value, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    above = lo is None or (value > lo if lo_open else value >= lo)
    below = hi is None or (value < hi if hi_open else value <= hi)
    return above and below


NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
PLURALS = {int: "integers", float: "numbers", str: "strings"}


def describe(tp, bounds=(None, None, False, False)) -> str:
    """What a value of type `tp` (within `bounds`, for its numbers) is, in words."""
    parts, nullable = [], False
    for t in members(tp):
        if t is type(None):
            nullable = True
        elif get_origin(t) is Literal:
            choices = dict.fromkeys(str(c) for c in get_args(t))
            parts.append(("one of " if len(choices) > 1 else "") + ", ".join(choices))
        elif t is list or get_origin(t) is list:
            parts.append("a list of " + PLURALS.get((get_args(t) or (Any,))[0], "values"))
        elif t in (int, float) and (bounds[0] is not None or bounds[1] is not None):
            parts.append(f"{NAMES[t]} {interval(*bounds)}")
        else:
            parts.append(NAMES.get(t, "a mapping" if dataclasses.is_dataclass(t) else "any value"))
    said = " or ".join(parts)
    return f"{said} (or null)" if nullable else said


@dataclass(frozen=True)
class Key:
    """One declared key of the schema: its dotted path, type and metadata."""

    path: str
    type: Any
    doc: str
    bounds: tuple
    check: Check | None
    says: str | None
    required: bool

    def allowed(self) -> str:
        return self.says or describe(self.type, self.bounds)

    def problem(self, value, cfg) -> str | None:
        """What the value must be, when it is not; None when it is fine."""
        if not fits(value, self.type):
            return self.allowed()
        if is_number(value) and not within(value, *self.bounds):
            return self.allowed()
        if value is not None and self.check is not None:
            wrong = self.check(value, cfg)
            if wrong:
                return self.says or wrong
        return None


def schema_keys(schema: type, prefix: str = "") -> dict[str, Key]:
    """The keys a schema dataclass declares, by name (nested dataclasses keep their own Key)."""
    hints = typing.get_type_hints(schema)
    keys = {}
    for f in dataclasses.fields(schema):
        m = f.metadata
        path = f"{prefix}.{f.name}" if prefix else f.name
        keys[f.name] = Key(path, hints[f.name], m["doc"], m["bounds"], m["check"], m["says"], m["required"])
    return keys


def all_keys(schema: type = TrainConfig, prefix: str = "") -> list[Key]:
    """Every key of a schema, nested ones included, in declaration order."""
    out = []
    for k in schema_keys(schema, prefix).values():
        out.append(k)
        if dataclasses.is_dataclass(k.type):
            out += all_keys(k.type, k.path)
    return out


def lookup(cfg: DictConfig, key: str, missing_ok: bool = False):
    """The value at a dotted key as plain Python, or ABSENT. `???` (unless missing_ok) and a broken
    `${...}` are a UserError."""
    try:
        value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=not missing_ok)
    except MissingMandatoryValue:
        raise UserError(f"config value {key} is required: set {key}=<value> on the command line") from None
    except OmegaConfBaseException as exc:
        raise UserError(
            f"config value {key} cannot be resolved ({one_line(exc, 160)}): set {key}=<value>"
        ) from None
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    )


def check_schema(
    cfg: DictConfig, schema: type, prefix: str = "", closed: bool = True, loose: bool = False
) -> None:
    """Check the node at `prefix` against `schema`: the first bad value is a UserError.

    closed: a key the schema does not declare is refused (except in the OPEN groups). loose (eval,
    compress): no key is required, and a `???` is a value not given.
    """
    node = OmegaConf.select(cfg, prefix) if prefix else cfg
    declared = schema_keys(schema, prefix)
    if closed:
        for name in node:
            if name not in declared:
                path = f"{prefix}.{name}" if prefix else name
                why = (
                    OPEN[prefix](name) if prefix in OPEN else "not a key of the schema (visiontune/config.py)"
                )
                if why:
                    raise UserError(
                        f"unknown config key {path}: {why}. visiontune-train --help lists the keys"
                    )
    for name, k in declared.items():
        if dataclasses.is_dataclass(k.type):
            sub = OmegaConf.select(node, name, default=ABSENT)
            if isinstance(sub, DictConfig):
                check_schema(cfg, k.type, k.path, closed, loose)
                continue
            if sub is ABSENT and not (k.required and not loose):
                continue
        value = lookup(cfg, k.path, missing_ok=loose)
        if value is ABSENT:
            if k.required and not loose:
                raise UserError(f"config key {k.path} is missing: add {k.path}=<value>")
            continue
        if loose and value == "???":
            continue
        allowed = k.problem(value, cfg)
        if allowed:
            raise UserError(f"invalid config value {k.path}={value!r}: must be {allowed}")


# -- the rules that span several keys
def fold_below_folds(value, cfg) -> str | None:
    folds = lookup(cfg, "data.folds")
    if is_int(value) and is_int(folds) and value >= folds:
        return f"an integer in [0, {folds}) (data.folds={folds})"
    return None


def max_epochs(value, cfg) -> str | None:
    """trainer.max_epochs: null only when trainer.max_steps bounds the run (-1, "forever", is refused)."""
    steps = lookup(cfg, "trainer.max_steps")
    if value is None and not (is_int(steps) and steps > 0):
        return "an integer >= 1 (or null with trainer.max_steps > 0)"
    return None


def jsd_views(value, cfg) -> str | None:
    """augment.jsd: AugMix's clean and augmented views of one image stay apart, so no batch mixing."""
    alphas = {k: lookup(cfg, k) for k in ("augment.mixup_alpha", "augment.cutmix_alpha")}
    mixing = [f"{k}={v}" for k, v in alphas.items() if is_number(v) and v > 0]
    if value is True and mixing:
        return (
            f"false with {' and '.join(mixing)} (MixUp/CutMix would blend the views of different "
            "images): set that alpha to 0, or augment.jsd=false"
        )
    return None


def task_name(value, cfg) -> str | None:
    """task.name, and what multilabel / multitask cannot be combined with (one class per image ideas)."""
    if value == "multiclass":
        return None
    if value == "multitask" and lookup(cfg, "task.heads") in (None, ABSENT, []):
        return "multiclass or multilabel without task.heads: set task.heads=[{name: a, column: a, kind: multiclass, weight: 1.0}, ...]"
    conflicts = [
        f"{key}={v}" for key in ("augment.mixup_alpha", "augment.cutmix_alpha") if is_number(v := lookup(cfg, key)) and v > 0
    ]  # fmt: skip
    if lookup(cfg, "augment.jsd") is True:
        conflicts.append("augment.jsd=true")
    if lookup(cfg, "distill.teacher") not in (None, ABSENT):
        conflicts.append("distill.teacher")
    if lookup(cfg, "data.balance") not in ("none", None, ABSENT):
        conflicts.append(f"data.balance={lookup(cfg, 'data.balance')}")
    if conflicts:
        return (
            f"multiclass with {', '.join(conflicts)} (they mix, distil or balance one class per image). "
            "Fix: turn them off for this task"
        )
    return None


def loss_weighting(value, cfg) -> str | None:
    if value == "uncertainty" and lookup(cfg, "task.name") != "multitask":
        return "fixed unless task=multitask (uncertainty weighs the losses of several heads)"
    return None


@dataclass(frozen=True)
class Rule:
    """A rule over several keys, reported at `key`: `check(value, cfg)` says what the value must be."""

    key: str
    check: Check


RULES = (
    Rule("data.fold", fold_below_folds),
    Rule("trainer.max_epochs", max_epochs),
    Rule("task.name", task_name),
    Rule("task.loss_weighting", loss_weighting),
    Rule("augment.jsd", jsd_views),
)


def check_rules(cfg: DictConfig, rules: tuple[Rule, ...], loose: bool = False) -> None:
    for rule in rules:
        value = lookup(cfg, rule.key, missing_ok=loose)
        if value is ABSENT or (loose and value == "???"):
            continue
        allowed = rule.check(value, cfg)
        if allowed:
            raise UserError(f"invalid config value {rule.key}={value!r}: must be {allowed}")


def warmup_too_long(cfg: DictConfig) -> str | None:
    warmup, epochs = lookup(cfg, "scheduler.warmup_epochs"), lookup(cfg, "trainer.max_epochs")
    if is_int(warmup) and is_int(epochs) and warmup > 0 and warmup >= epochs:
        return (
            f"scheduler.warmup_epochs={warmup} >= trainer.max_epochs={epochs}: the LR never leaves warmup. "
            f"Set scheduler.warmup_epochs < {epochs}"
        )
    return None


WARNINGS = (warmup_too_long,)


def as_config(cfg) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def validate_config(cfg) -> list[str]:
    """Check a composed train config once, at the start: the first bad value is a one-line UserError.

    Returns the warnings (also logged): suspicious but runnable settings, such as a warmup as long as
    the whole run.
    """
    cfg = as_config(cfg)
    check_schema(cfg, TrainConfig)
    check_rules(cfg, RULES)
    found = [w for w in (warn(cfg) for warn in WARNINGS) if w]
    for message in found:
        log.warning(message)
    return found


# -- the after-training commands: the keys they are given (all optional; `???` = not given)
@dataclass
class EvalTrainer:
    """trainer (eval): only the old spelling of `device`."""

    accelerator: str | None = key("the old spelling of device (still works, with a warning)")


@dataclass
class CompressTrainer(EvalTrainer):
    """trainer (compress): the old spelling of `device`, and the Trainer of the fine-tune after pruning."""

    devices: int | str | list[int] = key(
        "a count, -1 (all), auto, or a list of device indices", check=devices
    )
    precision: Precision = key("32, 16-mixed, bf16-mixed, ... (the fine-tune after pruning)")


@dataclass
class Adapt:
    """adapt (eval, predict): test-time adaptation of a copy of the model (evaluation/adapt.py)."""

    method: Literal[ADAPT_METHODS] = key("none, bn (re-estimate BatchNorm statistics) or tent (entropy minimisation)", required=True)  # fmt: skip
    lr: float = key("tent: the LR of the norm layers' affine parameters", gt=0)
    steps: int = key("tent: gradient steps per batch", ge=1)
    reset: Literal[ADAPT_RESETS] = key(
        "tent: never (adapt along the stream) or batch (restore before each batch)"
    )
    optimizer: Literal[ADAPT_OPTIMIZERS] = key("tent: adam or sgd (momentum 0.9)")
    shuffle: bool = key("the adapter sees the items in a seeded random order (false = the order given)")


@dataclass
class EvalConfig:
    """The keys of conf/eval.yaml that are checked before eval runs."""

    data: Data = key("patches to the checkpoint's data config")
    trainer: EvalTrainer = key("where the model runs")
    robustness: bool = key("re-test under common corruptions at severities 1-5")
    robustness_subset: int | None = key("the seeded test subset of the robustness eval (null = all)", ge=1)
    robustness_seed: int = key("seeds that subset and the random corruptions", ge=0)
    adapt: Adapt = key("test-time adaptation")


def validate_eval_config(cfg) -> list[str]:
    """The eval counterpart: the data and trainer keys given to eval (all optional; `???` = not given)."""
    cfg = as_config(cfg)
    check_schema(cfg, EvalConfig, closed=False, loose=True)
    check_rules(cfg, (Rule("data.fold", fold_below_folds),), loose=True)
    return []


@dataclass
class CompressConfig:
    """The keys of conf/compress.yaml that are its own."""

    ckpt_path: str = key("the checkpoint to compress", check=text, required=True)
    method: Literal["int8", "prune"] = key("int8 (quantize the ONNX export) or prune", required=True)
    amount: float = key("prune: the share of the weights removed", gt=0, lt=1)
    finetune_epochs: int = key("prune: epochs of fine-tuning after pruning", ge=0)
    finetune_lr: float | None = key("prune: the LR of that fine-tuning (null = the checkpoint's)", gt=0)
    calib_images: int = key("int8: images that calibrate the activation ranges", ge=1)
    quant_format: Literal["qoperator", "qdq"] = key("int8: the ONNX quantization format")
    reduce_range: AutoOrBool = key("int8: 7-bit weights (auto = on x86 CPUs without VNNI)")
    threads: int = key("CPU threads of the latency measurement", ge=1)
    latency_runs: int = key("runs of the latency measurement", ge=1)
    test_subset: int | None = key("test images of the accuracy comparison (null = all)", ge=1)
    tolerance: float = key("the parity tolerance of each ONNX export it writes (probabilities)", gt=0)
    trainer: CompressTrainer = key("where the fine-tune after pruning runs")


def validate_compress_config(cfg) -> list[str]:
    """The compress counterpart: its own keys, then the data and trainer keys given to it."""
    check_schema(as_config(cfg), CompressConfig, closed=False)
    return validate_eval_config(cfg)


# -- the settings a checkpoint stores: each of its config groups, under the key the command line uses
STORED_GROUPS = {
    "model": Model,
    "data": Data,
    "optimizer": Optimizer,
    "scheduler": Scheduler,
    "finetune": Finetune,
}


def check_checkpoint_settings(hparams: dict, source: str) -> None:
    """A checkpoint's stored config groups (its hyper_parameters) against the schema, as if typed on the
    command line: the first bad value is one line that names the checkpoint and the key. Open and loose
    (an older or newer checkpoint holds other keys, or fewer). `cli.run_cli` has every checkpoint load
    run it (`training.checkpoints.SETTINGS_CHECKS`)."""
    optim = hparams.get("optim") if isinstance(hparams.get("optim"), dict) else {}
    stored = {"model": hparams.get("model"), "data": hparams.get("data"), **optim}
    groups = {name: v for name, v in stored.items() if name in STORED_GROUPS and isinstance(v, dict)}
    try:
        cfg = OmegaConf.create(groups)
        for name in groups:
            check_schema(cfg, STORED_GROUPS[name], name, closed=False, loose=True)
        check_rules(cfg, (Rule("data.fold", fold_below_folds),), loose=True)
    except (UserError, OmegaConfBaseException) as exc:
        what = one_line(exc).replace("invalid config value ", "invalid stored setting ", 1)
        raise UserError(
            f"checkpoint {source}: {what}. It was edited, or not saved by visiontune: use another checkpoint of the run"
        ) from None


# -- `visiontune-train --help`
def option_names(conf_dir: Path) -> dict[str, list[str]]:
    """The groups of conf/ and their options, without the private bases (`_base`, `_standard`) and the
    groups that only eval and predict use (`adapt`)."""
    groups = sorted(d for d in conf_dir.iterdir() if d.is_dir() and d.name not in ("hydra", "adapt"))
    return {g.name: sorted(p.stem for p in g.glob("*.yaml") if not p.stem.startswith("_")) for g in groups}


def type_name(tp) -> str:
    """A short name of a schema type, for the help: int, float | null, auto | bool, list[int], ..."""
    names = []
    for t in members(tp):
        if get_origin(t) is Literal:
            choices = list(dict.fromkeys(str(c) for c in get_args(t)))
            names.append(
                " | ".join(choices)
                if len(choices) <= 5
                else " | ".join(dict.fromkeys(type(c).__name__ for c in get_args(t)))
            )
        elif get_origin(t) is list:
            names.append(f"list[{type_name(get_args(t)[0])}]")
        else:
            names.append("null" if t is type(None) else getattr(t, "__name__", str(t)))
    return " | ".join(names)


def shown(value) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 30 else text[:27] + "..."


def train_help(cfg: DictConfig | None = None, conf_dir: Path | None = None) -> str:
    """The text of `visiontune-train --help`: the groups and their options, then every key with its
    type, its value in `cfg` (the composed config, overrides included) and its doc."""
    conf = Path(__file__).resolve().parent / "conf"  # cli.CONF_DIR (cli imports this module)

    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None) if cfg is not None else None
    lines = [
        "visiontune-train: fine-tune a pretrained image model.",
        "",
        "  visiontune-train [group=option ...] [key=value ...]",
        "  e.g. visiontune-train data=imagefolder data.root=DIR finetune=linear_probe trainer.max_epochs=5",
        "",
        "== Config groups: group=option (* = the one chosen now) ==",
    ]
    for group, options in option_names(Path(conf_dir or conf)).items():
        chosen = choices.get(group) if choices is not None else None
        lines.append(f"  {group}: " + ", ".join(o + ("*" if o == chosen else "") for o in options))
    lines += ["", "== Keys: key (type) = value now: what it does =="]
    for k in all_keys():
        if dataclasses.is_dataclass(k.type):
            continue
        parent, _, name = k.path.rpartition(".")
        node = (OmegaConf.select(cfg, parent) if parent else cfg) if cfg is not None else None
        if isinstance(node, DictConfig) and name in node.keys():
            value = "???" if OmegaConf.is_missing(node, name) else node._get_node(name)._value()
            raw = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
            now = f" = {shown(raw)}"
        elif cfg is not None:
            continue  # a key of another option of its group
        else:
            now = ""
        lines.append(f"  {k.path} ({type_name(k.type)}){now}: {k.doc}")
    lines += [
        "  trainer.<any other lightning.Trainer argument>: passed through",
        "",
        "The keys of another option show with it chosen, e.g. visiontune-train augment=augmix --help.",
        "--cfg job prints the composed config; --hydra-help shows Hydra's own flags.",
    ]
    return "\n".join(lines).replace("$", "$$")  # Hydra fills the template with string.Template


def _help_resolver(*, _root_: DictConfig) -> str:
    try:
        return train_help(_root_)
    except Exception as exc:  # the help must come out whatever the config holds
        return f"(the config keys could not be listed: {exc})".replace("$", "$$")


# conf/hydra/help/train.yaml's template is `${visiontune_help:}`
OmegaConf.register_new_resolver("visiontune_help", _help_resolver, replace=True, use_cache=False)
