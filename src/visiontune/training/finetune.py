"""Fine-tuning strategies: a pure freeze schedule, and one thin callback that applies it.

A `FreezeSchedule` answers two questions, as pure functions of the epoch and step:
- `frozen_groups(epoch)`: the backbone groups frozen during that epoch;
- `lr_gate(group, step, steps_per_epoch)`: the LR multiplier of a group at an optimizer step.
It also carries the per-group LR keys (`backbone_lr_mult`, `layer_decay`): every key of the
`finetune` config group is the schedule's, except those of the frozen-feature cache (`CACHE_KEYS`,
read by visiontune.training.features). The model builds it (its LR scheduler multiplies the gate
in), and `ApplyFreeze` reads it from the model to toggle `requires_grad` and BatchNorm mode.

Because the frozen set is derived from the epoch, a resumed run lands in exactly the state of an
uninterrupted one without storing anything (docs/architecture.md, "Invariants").
The parameter-efficient schedules (bitfit, norm, lora: `ParameterEfficient`) train a fixed set of
tensors inside the backbone, `trains(name)`, and freeze the groups that hold none of them.
Frozen BatchNorm means eval mode: running statistics untouched and affine parameters frozen,
unless `train_bn=true`. Lightning may call `model.train()` around validation, so the mode is
re-applied at the start of every training batch, which costs a few attribute reads.
Under DDP a parameter frozen when the wrapper was built is invisible to the reducer forever, so
there the schedule uses a soft freeze: everything stays trainable and frozen groups get LR 0.
"""

from __future__ import annotations

import logging
import re

import lightning as L
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from visiontune.errors import UserError
from visiontune.training.param_groups import describe_lrs

log = logging.getLogger(__name__)


class FreezeSchedule:
    """Base schedule: nothing frozen (`finetune=full`). Subclasses override `frozen_groups`."""

    name = "full"
    unfreezes = False  # does the frozen set shrink during training?

    def __init__(
        self,
        group_names: list[str],
        backbone_lr_mult: float = 1.0,
        layer_decay: float = 1.0,
        train_bn: bool = False,
        unfreeze_warmup_steps: int = 0,
        soft_freeze: str | bool = "auto",
    ):
        self.group_names = list(group_names)
        self.num_groups = len(group_names)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.layer_decay = float(layer_decay)
        self.train_bn = bool(train_bn)
        self.unfreeze_warmup_steps = int(unfreeze_warmup_steps)
        if soft_freeze not in ("auto", True, False):
            raise UserError(f"finetune.soft_freeze={soft_freeze!r}; choose auto, true or false")
        self.soft_freeze = soft_freeze
        self.soft = False  # decided at fit start from the trainer's strategy (see ApplyFreeze)

    def frozen_groups(self, epoch: int) -> set[int]:
        return set()

    def trains(self, name: str) -> bool:
        """Whether backbone parameter `name` trains while its group is not frozen (here: all of them)."""
        return True

    def norm_frozen(self, group_frozen: bool) -> bool:
        """Whether the BatchNorm layers of a group run in eval mode (statistics untouched)."""
        return group_frozen and not self.train_bn

    def unfrozen_since(self, group: int, epoch: int) -> int | None:
        """First epoch of the current unfrozen stretch of `group`, or None while it is frozen."""
        if group in self.frozen_groups(epoch):
            return None
        while epoch > 0 and group not in self.frozen_groups(epoch - 1):
            epoch -= 1
        return epoch

    def lr_gate(self, group: int, step: int, steps_per_epoch: int) -> float:
        """LR multiplier of backbone group `group` at optimizer step `step` (head: group -1)."""
        if group < 0:
            return 1.0
        since = self.unfrozen_since(group, step // steps_per_epoch)
        if since is None:
            # Hard-frozen parameters have no gradient, so the LR only matters for BN under train_bn.
            return 0.0 if self.soft else 1.0
        if since == 0 or self.unfreeze_warmup_steps <= 0:
            return 1.0
        return min(1.0, (step - since * steps_per_epoch + 1) / self.unfreeze_warmup_steps)


class Full(FreezeSchedule):
    """Fine-tune everything from the first step."""


class LinearProbe(FreezeSchedule):
    """Backbone frozen throughout; only the head trains."""

    name = "linear_probe"

    def frozen_groups(self, epoch: int) -> set[int]:
        return set(range(self.num_groups))


class FreezeUnfreeze(FreezeSchedule):
    """Backbone frozen for epochs 0..N-1 (head warm-up), all trainable from epoch N."""

    name = "freeze_unfreeze"
    unfreezes = True

    def __init__(self, group_names: list[str], unfreeze_at_epoch: int = 1, **kwargs):
        super().__init__(group_names, **kwargs)
        self.unfreeze_at_epoch = int(unfreeze_at_epoch)

    def frozen_groups(self, epoch: int) -> set[int]:
        return set(range(self.num_groups)) if epoch < self.unfreeze_at_epoch else set()


class Gradual(FreezeSchedule):
    """Unfreeze one more group from the top at each milestone epoch (default: every K epochs)."""

    name = "gradual"
    unfreezes = True

    def __init__(
        self, group_names: list[str], every_k_epochs: int = 1, milestones: list[int] | None = None, **kwargs
    ):
        super().__init__(group_names, **kwargs)
        if int(every_k_epochs) < 1:
            raise UserError(f"finetune.every_k_epochs={every_k_epochs}: must be at least 1")
        self.every_k_epochs = int(every_k_epochs)
        self.milestones = sorted(int(m) for m in milestones) if milestones else None

    def unfrozen_count(self, epoch: int) -> int:
        if self.milestones is not None:
            return sum(m <= epoch for m in self.milestones)
        return epoch // self.every_k_epochs

    def frozen_groups(self, epoch: int) -> set[int]:
        return set(range(max(0, self.num_groups - self.unfrozen_count(epoch))))


class FreezeGroups(FreezeSchedule):
    """A fixed set of frozen groups: an index range "start:stop" (Python slice), a list, or a name regex."""

    name = "freeze_groups"

    def __init__(
        self,
        group_names: list[str],
        groups: str | int | list[int] | None = None,
        pattern: str | None = None,
        **kw,
    ):
        super().__init__(group_names, **kw)
        self.frozen = select_groups(self.group_names, groups, pattern)

    def frozen_groups(self, epoch: int) -> set[int]:
        return set(self.frozen)


class ParameterEfficient(FreezeSchedule):
    """A few parameters inside the backbone train, the same ones for the whole run, and the head.

    `trains(name)` picks them; a group with none of them is frozen whole (so a frozen bottom can be
    cached). The set never changes, so there is no soft freeze under DDP: the reducer sees the
    trainable parameters from the first step. Subclasses read the backbone's layers (`backbone`).
    """

    update_norm_stats = False  # do the norm layers run in training mode (their statistics adapt)?

    def __init__(self, group_names: list[str], backbone=None, **kwargs):
        if kwargs.get("soft_freeze") is True:
            raise UserError(
                f"finetune={self.name} trains the same parameters all run: soft_freeze does not apply"
            )
        kwargs["soft_freeze"] = False
        super().__init__(group_names, **kwargs)
        self.selected = self.select(backbone) if backbone is not None else set()
        params = backbone.group_parameters() if backbone is not None else [[] for _ in group_names]
        self.frozen = {i for i, named in enumerate(params) if not any(n in self.selected for n, _ in named)}

    def select(self, backbone) -> set[str]:
        raise NotImplementedError

    def trains(self, name: str) -> bool:
        return name in self.selected

    def frozen_groups(self, epoch: int) -> set[int]:
        return set(self.frozen)

    def norm_frozen(self, group_frozen: bool) -> bool:
        return not self.update_norm_stats


class BitFit(ParameterEfficient):
    """BitFit: the backbone's biases (norm layers' included) and the head."""

    name = "bitfit"

    def select(self, backbone) -> set[str]:
        return {n for n, _ in backbone.named_parameters() if n.endswith(".bias")}


class NormOnly(ParameterEfficient):
    """The norm layers' affine parameters and the head; BatchNorm statistics adapt to the new data."""

    name = "norm"
    update_norm_stats = True

    def select(self, backbone) -> set[str]:
        from visiontune.models.adapters import NORM_TYPES

        return {
            f"{module_name}.{n}"
            for module_name, module in backbone.named_modules()
            if isinstance(module, NORM_TYPES)
            for n, _ in module.named_parameters(recurse=False)
        }


class Lora(ParameterEfficient):
    """LoRA: low-rank updates of chosen Linear/Conv2d layers (models/adapters.py adds them to the backbone
    before this schedule is made), and the head. `groups`/`pattern` (as freeze_groups') name groups that
    get no adapter: frozen whole."""

    name = "lora"

    def __init__(self, group_names, backbone=None, lora: dict | None = None, groups=None, pattern=None, **kw):
        # lora, groups and pattern shape the adapters, which the model adds before it makes this schedule
        super().__init__(group_names, backbone=backbone, **kw)

    def select(self, backbone) -> set[str]:
        from visiontune.models.adapters import LORA_MARK

        return {n for n, _ in backbone.named_parameters() if LORA_MARK in n}


def _index(text: str, n: int, what: str) -> int:
    try:
        i = int(text)
    except ValueError:
        raise UserError(f"finetune.groups: {what} {text!r} is not an integer") from None
    if not -n <= i < n:
        raise UserError(
            f"finetune.groups: group {i} is out of range for {n} groups (valid: 0..{n - 1} or -{n}..-1)"
        )
    return i % n


def _bound(text: str, n: int) -> int | None:
    """A slice bound: empty means open; otherwise an index within -n..n (n = one past the top)."""
    if not text.strip():
        return None
    try:
        i = int(text)
    except ValueError:
        raise UserError(f"finetune.groups: slice bound {text!r} is not an integer") from None
    if not -n <= i <= n:
        raise UserError(f"finetune.groups: slice bound {i} is out of range for {n} groups (valid: -{n}..{n})")
    return i


def select_groups(names: list[str], groups: str | int | list[int] | None, pattern: str | None) -> set[int]:
    """Group indices chosen by a slice string ("1:3", ":-1"), one index, an index list, and/or a name regex.

    Out-of-range indices are an error (no wrapping, no clamping), and so is a selection of nothing.
    """
    n = len(names)
    chosen: set[int] = set()
    if isinstance(groups, str) and ":" in groups:
        parts = groups.split(":")
        if len(parts) != 2:
            raise UserError(f'finetune.groups={groups!r}: use start:stop, e.g. "0:3" or "1:-1"')
        chosen |= set(range(n)[slice(_bound(parts[0], n), _bound(parts[1], n))])
    elif isinstance(groups, str | int):
        chosen.add(_index(str(groups), n, "index"))
    elif groups is not None:
        chosen |= {_index(str(g), n, "index") for g in groups}
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise UserError(f"finetune.pattern={pattern!r} is not a valid regex ({exc})") from None
        chosen |= {i for i, name in enumerate(names) if regex.search(name)}
    if not chosen:
        raise UserError(
            f"finetune.groups={groups!r} pattern={pattern!r} selects no group of {names}; "
            "use finetune=full to freeze nothing"
        )
    return chosen


SCHEDULES = {
    cls.name: cls
    for cls in (Full, LinearProbe, FreezeUnfreeze, Gradual, FreezeGroups, BitFit, NormOnly, Lora)
}


# keys of the finetune group read by the frozen-feature cache (visiontune.training.features), not by a schedule
CACHE_KEYS = ("cache_features", "cache_views", "cache_dir")


def create_schedule(cfg: dict, group_names: list[str], backbone=None) -> FreezeSchedule:
    """The schedule of the `finetune` config group (every key but `CACHE_KEYS` is its argument). The
    parameter-efficient ones read which parameters they train from `backbone`."""
    kwargs = {k: v for k, v in cfg.items() if k not in CACHE_KEYS}
    name = kwargs.pop("name", "full")
    if name not in SCHEDULES:
        raise UserError(f"unknown fine-tuning strategy finetune={name}; choose one of {', '.join(SCHEDULES)}")
    if issubclass(SCHEDULES[name], ParameterEfficient):
        kwargs["backbone"] = backbone
    try:
        return SCHEDULES[name](group_names, **kwargs)
    except TypeError as exc:  # an unknown key for this strategy
        raise UserError(f"finetune={name}: {exc}".replace("__init__() ", "")) from None


class ApplyFreeze(L.Callback):
    """Applies the model's `freeze_schedule`: `requires_grad` and BatchNorm mode, at each epoch start.

    It never adds optimizer groups: every group exists from step 0 (see param_groups.py).
    """

    def __init__(self, soft_freeze: str | bool | None = None):
        self.soft_override = soft_freeze
        self._applied: frozenset[int] | None = None
        self._frozen_bn: list[nn.Module] = []
        self.start_counts: dict[str, int] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # testing after fit must not redo the freeze (nor overwrite start_counts)
            return
        schedule = pl_module.freeze_schedule
        setting = schedule.soft_freeze if self.soft_override is None else self.soft_override
        distributed = not isinstance(trainer.strategy, SingleDeviceStrategy)
        schedule.soft = distributed if setting == "auto" else bool(setting)
        self._apply(pl_module, trainer.current_epoch, bn=False)
        self.start_counts = parameter_counts(pl_module, schedule.soft and schedule.frozen_groups(0))

    def on_train_start(self, trainer, pl_module) -> None:
        self._applied = None
        self._apply(pl_module, trainer.current_epoch, bn=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._apply(pl_module, trainer.current_epoch, bn=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for module in self._frozen_bn:
            if module.training:
                module.eval()

    def _apply(self, pl_module: L.LightningModule, epoch: int, bn: bool) -> None:
        schedule: FreezeSchedule = pl_module.freeze_schedule
        frozen = frozenset(schedule.frozen_groups(epoch))
        backbone = pl_module.backbone
        self._frozen_bn = []
        for i, (named, modules) in enumerate(
            zip(backbone.group_parameters(), backbone.group_modules(), strict=True)
        ):
            is_frozen = i in frozen
            bn_params = {
                id(p) for m in modules if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)
            }
            for n, p in named:
                trainable_bn = schedule.train_bn and id(p) in bn_params
                p.requires_grad_(schedule.soft or (not is_frozen and schedule.trains(n)) or trainable_bn)
            if schedule.norm_frozen(is_frozen):
                self._frozen_bn += [m for m in modules if isinstance(m, _BatchNorm)]
        if bn and pl_module.training:
            frozen_bn = {id(m) for m in self._frozen_bn}
            for m in backbone.modules():
                if isinstance(m, _BatchNorm):
                    m.train(id(m) not in frozen_bn)
        if frozen != self._applied:
            self._applied = frozen
            self._report(pl_module, epoch, frozen)

    def _report(self, pl_module, epoch: int, frozen: frozenset[int]) -> None:
        schedule = pl_module.freeze_schedule
        counts = parameter_counts(pl_module, schedule.soft and frozen)
        names = [name for i, name in enumerate(schedule.group_names) if i in frozen]
        mode = " (soft freeze: LR 0)" if schedule.soft and frozen else ""
        log.info(
            "%s epoch %d: %d trainable / %d frozen parameters; frozen groups%s: %s",
            schedule.name, epoch, counts["trainable_params"], counts["frozen_params"], mode, names or "none",
        )  # fmt: skip
        trainer = pl_module._trainer
        if trainer is not None and trainer.optimizers:
            log.info("group LRs now: %s", describe_lrs(trainer.optimizers[0]))

    def state_dict(self) -> dict:
        return {}  # the frozen set is derived from the epoch, nothing else to keep


def parameter_counts(
    pl_module: L.LightningModule, soft_frozen: frozenset[int] | set[int] | bool = ()
) -> dict:
    """Trainable and frozen parameter counts (soft-frozen groups count as frozen)."""
    soft_ids = set()
    if soft_frozen:
        for i, named in enumerate(pl_module.backbone.group_parameters()):
            if i in soft_frozen:
                soft_ids |= {id(p) for _, p in named}
    trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad and id(p) not in soft_ids)
    total = sum(p.numel() for p in pl_module.parameters())
    return {"trainable_params": trainable, "frozen_params": total - trainable}
