"""Config validation: every value of a composed config is checked once, before anything runs.

The schema is the table `RULES`: a config key, what its value must be, and whether it may be null or
absent. A bad value is a one-line UserError that names the key, the value and what is allowed, e.g.
`invalid config value data.batch_size=0: must be an integer >= 1`. Checks that need the backbone
(group indices against its real number of groups) happen later, where the backbone is known.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from visiontune.data.datamodule import BALANCE
from visiontune.errors import UserError
from visiontune.models.heads import TASKS, WEIGHTINGS, check_heads
from visiontune.training.finetune import SCHEDULES as FREEZE_SCHEDULES
from visiontune.training.module import OPTIMIZERS
from visiontune.training.schedules import SCHEDULES

log = logging.getLogger("visiontune")

FINETUNE_STRATEGIES = tuple(FREEZE_SCHEDULES)
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


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


def integer(lo: int | None = None, below: int | str | None = None) -> Check:
    """An int >= lo (and < below: a number, or another key of the config such as "data.folds")."""

    def check(value, cfg):
        hi = lookup(cfg, below) if isinstance(below, str) else below
        hi = hi if is_int(hi) else None
        if is_int(value) and within(value, lo, hi, False, True):
            return None
        context = f" ({below}={hi})" if isinstance(below, str) and hi is not None else ""
        return f"an integer {interval(lo, hi, False, True)}{context}"

    return check


def number(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=True) -> Check:
    def check(value, cfg):
        if is_number(value) and within(value, lo, hi, lo_open, hi_open):
            return None
        return f"a number {interval(lo, hi, lo_open, hi_open)}"

    return check


def one_of(*choices) -> Check:
    def check(value, cfg):
        if not isinstance(value, bool) and any(value == c and type(value) is type(c) for c in choices):
            return None
        return "one of " + ", ".join(dict.fromkeys(str(c) for c in choices))

    return check


SLICE = re.compile(r"\s*-?\d*\s*:\s*-?\d*\s*|\s*-?\d+\s*")


def group_selection(value, cfg) -> str | None:
    """finetune.groups: null, an index, a list of indices, or a "start:stop" slice string."""
    ok = (
        is_int(value)
        or (isinstance(value, list) and all(is_int(v) for v in value))
        or (isinstance(value, str) and SLICE.fullmatch(value) is not None)
    )
    return None if ok else 'null, an integer, a list of integers, or a slice string "start:stop" like "0:3"'


def text(value, cfg) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def regex(value, cfg) -> str | None:
    if not isinstance(value, str):
        return "a regular expression (string)"
    try:
        re.compile(value)
    except re.error as exc:
        return f"a valid regular expression ({exc})"
    return None


def devices(value, cfg) -> str | None:
    ok = (
        (is_int(value) and (value >= 1 or value == -1))
        or (isinstance(value, str) and value.strip() not in ("", "0"))
        or (isinstance(value, list) and len(value) > 0 and all(is_int(v) and v >= 0 for v in value))
    )
    return None if ok else "a count >= 1, -1 (all), 'auto', or a list of device indices"


def auto_or_bool(value, cfg) -> str | None:
    return None if value == "auto" or isinstance(value, bool) else "auto, true or false"


def checkpoint_file(value, cfg) -> str | None:
    """A local checkpoint that exists (URLs are checked when they are read)."""
    if not isinstance(value, str) or not value.strip():
        return "a checkpoint path (<run dir>/checkpoints/best.ckpt)"
    if "://" in value or Path(value).expanduser().is_file():
        return None
    return "an existing checkpoint file (<run dir>/checkpoints/best.ckpt); none is there"


def max_epochs(value, cfg) -> str | None:
    """trainer.max_epochs: >= 1, or null when trainer.max_steps bounds the run (-1, "forever", is refused)."""
    steps = lookup(cfg, "trainer.max_steps")
    if (value is None and is_int(steps) and steps > 0) or (is_int(value) and value >= 1):
        return None
    return "an integer >= 1 (or null with trainer.max_steps > 0)"


def boolean(value, cfg) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def jsd_views(value, cfg) -> str | None:
    """augment.jsd: AugMix's clean and augmented views of one image stay apart, so no batch mixing."""
    if not isinstance(value, bool):
        return "true or false"
    alphas = {k: lookup(cfg, k) for k in ("augment.mixup_alpha", "augment.cutmix_alpha")}
    mixing = [f"{k}={v}" for k, v in alphas.items() if is_number(v) and v > 0]
    if value and mixing:
        return (
            f"false with {' and '.join(mixing)} (MixUp/CutMix would blend the views of different "
            "images): set that alpha to 0, or augment.jsd=false"
        )
    return None


def task_name(value, cfg) -> str | None:
    """task.name, and what multilabel / multitask cannot be combined with (one class per image ideas)."""
    if value not in TASKS:
        return "one of " + ", ".join(TASKS)
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


def threshold(value, cfg) -> str | None:
    return None if value == "auto" or (is_number(value) and 0 < value < 1) else "a number in (0, 1), or auto"


def loss_weighting(value, cfg) -> str | None:
    if value not in WEIGHTINGS:
        return "one of " + ", ".join(WEIGHTINGS)
    if value == "uncertainty" and lookup(cfg, "task.name") != "multitask":
        return "fixed unless task=multitask (uncertainty weighs the losses of several heads)"
    return None


@dataclass(frozen=True)
class Rule:
    key: str
    check: Check
    nullable: bool = False  # null means "the default" (e.g. the backbone's own image size)
    required: bool = False  # absent is an error (otherwise an absent key is not checked)


RULES = (
    Rule("data.root", text, required=True),
    Rule("data.batch_size", integer(lo=1), required=True),
    Rule("data.num_workers", integer(lo=0), nullable=True),
    Rule("data.image_size", integer(lo=1), nullable=True),
    Rule("data.val_fraction", number(0, 1)),
    Rule("data.train_subset", integer(lo=1), nullable=True),
    Rule("data.val_subset", integer(lo=1), nullable=True),
    Rule("data.test_subset", integer(lo=1), nullable=True),
    Rule("data.crop_pct", number(0, 1, lo_open=True, hi_open=False), nullable=True),
    Rule("data.balance", one_of(*BALANCE)),
    Rule("data.device_transforms", auto_or_bool),
    Rule("data.cache", one_of("none", "memory", "disk")),
    Rule("data.cache_dir", text, nullable=True),
    Rule("data.folds", integer(lo=2), nullable=True),
    Rule("data.fold", integer(lo=0, below="data.folds"), nullable=True),
    Rule("optimizer.name", one_of(*OPTIMIZERS), required=True),
    Rule("optimizer.lr", number(0, lo_open=True), required=True),
    Rule("optimizer.weight_decay", number(0)),
    Rule("optimizer.momentum", number(0, 1, hi_open=False)),
    Rule("scheduler.name", one_of(*SCHEDULES), required=True),
    Rule("scheduler.warmup_epochs", integer(lo=0)),
    Rule("scheduler.warmup_steps", integer(lo=0)),
    Rule("finetune.name", one_of(*FINETUNE_STRATEGIES), required=True),
    Rule("finetune.groups", group_selection, nullable=True),
    Rule("finetune.pattern", regex, nullable=True),
    Rule("finetune.backbone_lr_mult", number(0)),
    Rule("finetune.layer_decay", number(0, 1, lo_open=True, hi_open=False)),
    Rule("finetune.unfreeze_warmup_steps", integer(lo=0)),
    Rule("finetune.cache_features", auto_or_bool),
    Rule("finetune.cache_views", integer(lo=1)),
    Rule("finetune.cache_dir", text, nullable=True),
    Rule("model.head.dropout", number(0, 1)),
    Rule("model.head.hidden", integer(lo=1), nullable=True),
    Rule("model.label_smoothing", number(0, 1)),
    Rule("trainer.precision", one_of(*lightning_precisions())),
    Rule("trainer.max_epochs", max_epochs, required=True),
    Rule("trainer.devices", devices),
    Rule("trainer.accumulate_grad_batches", integer(lo=1)),
    Rule("task.name", task_name),
    Rule("task.label_sep", text),
    Rule("task.threshold", threshold),
    Rule("task.heads", check_heads, nullable=True),
    Rule("task.loss_weighting", loss_weighting),
    Rule("task.pos_weight", boolean),
    Rule("augment.jsd", jsd_views),
    Rule("augment.jsd_weight", number(0)),
    Rule("distill.teacher", checkpoint_file, nullable=True),
    Rule("distill.alpha", number(0, 1, hi_open=False)),
    Rule("distill.temperature", number(0, lo_open=True)),
)
# eval: the data keys it is given (the rest come from the checkpoint) and the trainer keys it has
EVAL_RULES = tuple(
    Rule(r.key, r.check, r.nullable)
    for r in RULES
    if r.key.startswith("data.") or r.key in ("trainer.precision", "trainer.devices")
) + (
    Rule("robustness", boolean),
    Rule("robustness_subset", integer(lo=1), nullable=True),
    Rule("robustness_seed", integer(lo=0)),
)


def lookup(cfg: DictConfig, key: str, missing_ok: bool = False):
    """The value at a dotted key as plain Python, or ABSENT. `???` (unless missing_ok) and a broken
    `${...}` are a UserError."""
    try:
        value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=not missing_ok)
    except MissingMandatoryValue:
        raise UserError(f"config value {key} is required: set {key}=<value> on the command line") from None
    except OmegaConfBaseException as exc:
        raise UserError(
            f"config value {key} cannot be resolved ({one_line(exc)}): set {key}=<value>"
        ) from None
    return (
        OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    )


def one_line(text: object, limit: int = 160) -> str:
    return " ".join(str(text).split())[:limit]


def problem(rule: Rule, cfg: DictConfig, missing_ok: bool = False) -> str | None:
    """The one-line message for a bad value at `rule.key`, or None."""
    value = lookup(cfg, rule.key, missing_ok)
    if value is ABSENT:
        return f"config key {rule.key} is missing: add {rule.key}=<value>" if rule.required else None
    if value is None and rule.nullable:
        return None
    allowed = rule.check(value, cfg)
    return f"invalid config value {rule.key}={value!r}: must be {allowed}" if allowed else None


def warmup_too_long(cfg: DictConfig) -> str | None:
    warmup, epochs = lookup(cfg, "scheduler.warmup_epochs"), lookup(cfg, "trainer.max_epochs")
    if is_int(warmup) and is_int(epochs) and warmup > 0 and warmup >= epochs:
        return (
            f"scheduler.warmup_epochs={warmup} >= trainer.max_epochs={epochs}: the LR never leaves warmup. "
            f"Set scheduler.warmup_epochs < {epochs}"
        )
    return None


WARNINGS = (warmup_too_long,)


def check(cfg, rules: tuple[Rule, ...], warnings: tuple = (), missing_ok: bool = False) -> list[str]:
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    for rule in rules:
        message = problem(rule, cfg, missing_ok)
        if message:
            raise UserError(message)
    found = [w for w in (warn(cfg) for warn in warnings) if w]
    for message in found:
        log.warning(message)
    return found


def validate_config(cfg) -> list[str]:
    """Check a composed train config once, at the start: the first bad value is a one-line UserError.

    Returns the warnings (also logged): suspicious but runnable settings, such as a warmup as long as
    the whole run.
    """
    return check(cfg, RULES, WARNINGS)


def validate_eval_config(cfg) -> list[str]:
    """The eval counterpart: the data and trainer keys given to eval (all optional; `???` = not given)."""
    return check(cfg, EVAL_RULES, missing_ok=True)


# compress: its own keys (the data and trainer keys it is given are checked as eval's)
COMPRESS_RULES = (
    Rule("ckpt_path", text, required=True),
    Rule("method", one_of("int8", "prune"), required=True),
    Rule("amount", number(0, 1, lo_open=True, hi_open=True)),
    Rule("finetune_epochs", integer(lo=0)),
    Rule("finetune_lr", number(0, lo_open=True), nullable=True),
    Rule("calib_images", integer(lo=1)),
    Rule("quant_format", one_of("qoperator", "qdq")),
    Rule("reduce_range", auto_or_bool),
    Rule("threads", integer(lo=1)),
    Rule("latency_runs", integer(lo=1)),
    Rule("test_subset", integer(lo=1), nullable=True),
)


def validate_compress_config(cfg) -> list[str]:
    """The compress counterpart: its own keys, then the data and trainer keys given to it."""
    check(cfg, COMPRESS_RULES)
    return check(cfg, EVAL_RULES, missing_ok=True)
