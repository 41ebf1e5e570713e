"""Fine-tuning strategies as Lightning callbacks.

A strategy is one pure function, `frozen_groups(epoch)`: the backbone groups frozen during that
epoch. Everything else follows from it, so a resumed run lands in exactly the state of an
uninterrupted one (DESIGN rule 3) without storing anything. Strategies only toggle
`requires_grad` and BatchNorm mode; the optimizer groups exist from step 0 (rule 1).

Frozen BatchNorm means eval mode: running statistics untouched and affine parameters frozen,
unless `train_bn=true` (rule 2). Lightning may call `model.train()` around validation, so the mode
is re-applied at the start of every training batch, which costs a few attribute reads.

Under DDP a parameter frozen when the wrapper was built is invisible to the reducer forever
(Lightning #20340), so there the strategy uses a soft freeze: everything stays trainable and frozen
groups get LR 0 through `lr_gate` (rule 4).
"""

from __future__ import annotations

import logging
import re

import lightning as L
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)


class FinetuneStrategy(L.Callback):
    """Base: nothing frozen. Subclasses override `frozen_groups`."""

    name = "full"
    unfreezes = False  # does the frozen set shrink during training?

    def __init__(
        self, train_bn: bool = False, unfreeze_warmup_steps: int = 0, soft_freeze: str | bool = "auto"
    ):
        self.train_bn = train_bn
        self.unfreeze_warmup_steps = int(unfreeze_warmup_steps)
        self.soft_freeze = soft_freeze
        self.num_groups = 0
        self.soft = False
        self._applied: frozenset[int] | None = None
        self._frozen_bn: list[nn.Module] = []
        self.start_counts: dict[str, int] = {}

    # -- the strategy itself (pure)
    def frozen_groups(self, epoch: int) -> set[int]:
        return set()

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

    # -- applying it
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # testing after fit must not redo the freeze (nor overwrite start_counts)
            return
        self.num_groups = len(pl_module.backbone.groups)
        soft = not isinstance(trainer.strategy, SingleDeviceStrategy)
        self.soft = soft if self.soft_freeze == "auto" else bool(self.soft_freeze)
        self._apply(pl_module, trainer.current_epoch, bn=False)
        self.start_counts = parameter_counts(pl_module, self.soft and self.frozen_groups(0))

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
        frozen = frozenset(self.frozen_groups(epoch))
        bad = [g for g in frozen if not 0 <= g < self.num_groups]
        if bad:
            raise ValueError(f"{self.name}: group indices {bad} out of range 0..{self.num_groups - 1}")
        backbone = pl_module.backbone
        self._frozen_bn = []
        for i, (named, modules) in enumerate(
            zip(backbone.group_parameters(), backbone.group_modules(), strict=True)
        ):
            is_frozen = i in frozen
            bn_params = {
                id(p) for m in modules if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)
            }
            for _, p in named:
                trainable_bn = self.train_bn and id(p) in bn_params
                p.requires_grad_(self.soft or not is_frozen or trainable_bn)
            if is_frozen and not self.train_bn:
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
        counts = parameter_counts(pl_module, self.soft and frozen)
        names = [g.name for i, g in enumerate(pl_module.backbone.groups) if i in frozen]
        mode = " (soft freeze: LR 0)" if self.soft and frozen else ""
        log.info(
            "%s epoch %d: %d trainable / %d frozen parameters; frozen groups%s: %s",
            self.name, epoch, counts["trainable_params"], counts["frozen_params"], mode, names or "none",
        )  # fmt: skip
        trainer = pl_module._trainer
        if trainer is not None and trainer.optimizers:
            from visiontune.module import describe_lrs

            log.info("group LRs now: %s", describe_lrs(trainer.optimizers[0]))

    def state_dict(self) -> dict:
        return {"name": self.name}  # the frozen set is derived from the epoch, nothing else to keep

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("name", self.name) != self.name:
            log.warning(
                "checkpoint was trained with strategy %s, resuming with %s", state_dict["name"], self.name
            )


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


class Full(FinetuneStrategy):
    """Fine-tune everything from the first step."""


class LinearProbe(FinetuneStrategy):
    """Backbone frozen throughout; only the head trains."""

    name = "linear_probe"

    def frozen_groups(self, epoch: int) -> set[int]:
        return set(range(self.num_groups))


class FreezeUnfreeze(FinetuneStrategy):
    """Backbone frozen for epochs 0..N-1 (head warm-up), all trainable from epoch N."""

    name = "freeze_unfreeze"
    unfreezes = True

    def __init__(self, unfreeze_at_epoch: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.unfreeze_at_epoch = int(unfreeze_at_epoch)

    def frozen_groups(self, epoch: int) -> set[int]:
        return set(range(self.num_groups)) if epoch < self.unfreeze_at_epoch else set()


class Gradual(FinetuneStrategy):
    """Unfreeze one more group from the top at each milestone epoch (default: every K epochs)."""

    name = "gradual"
    unfreezes = True

    def __init__(self, every_k_epochs: int = 1, milestones: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.every_k_epochs = int(every_k_epochs)
        self.milestones = sorted(int(m) for m in milestones) if milestones else None

    def unfrozen_count(self, epoch: int) -> int:
        if self.milestones is not None:
            return sum(m <= epoch for m in self.milestones)
        return epoch // self.every_k_epochs

    def frozen_groups(self, epoch: int) -> set[int]:
        return set(range(max(0, self.num_groups - self.unfrozen_count(epoch))))


class FreezeGroups(FinetuneStrategy):
    """A fixed set of frozen groups: an index range "start:stop" (Python slice), a list, or a name regex.

    "0:3" freezes the bottom three groups; "2:-1" the middle ones (all but the first two and the last).
    """

    name = "freeze_groups"

    def __init__(self, groups: str | list[int] | None = None, pattern: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups
        self.pattern = pattern
        self.group_names: list[str] = []

    def setup(self, trainer, pl_module, stage) -> None:
        self.group_names = [g.name for g in pl_module.backbone.groups]
        super().setup(trainer, pl_module, stage)

    def frozen_groups(self, epoch: int) -> set[int]:
        return select_groups(self.group_names, self.groups, self.pattern)


def select_groups(names: list[str], groups: str | list[int] | None, pattern: str | None) -> set[int]:
    """Group indices chosen by a slice string ("1:3", ":-1"), an index list, and/or a name regex."""
    n = len(names)
    chosen: set[int] = set()
    if isinstance(groups, str):
        parts = [int(x) if x.strip() else None for x in groups.split(":")]
        chosen |= set(range(n)[slice(*parts)]) if len(parts) > 1 else {parts[0] % n}
    elif groups is not None:
        chosen |= {int(g) % n for g in groups}
    if pattern:
        chosen |= {i for i, name in enumerate(names) if re.search(pattern, name)}
    return chosen


STRATEGIES = {cls.name: cls for cls in (Full, LinearProbe, FreezeUnfreeze, Gradual, FreezeGroups)}
LR_KEYS = ("name", "backbone_lr_mult", "layer_decay")


def create_strategy(cfg: dict) -> FinetuneStrategy:
    """The callback for `cfg["name"]`; the LR keys of the group go to the optimizer, not here."""
    name = cfg.get("name", "full")
    if name not in STRATEGIES:
        raise ValueError(f"unknown fine-tuning strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    kwargs = {k: v for k, v in cfg.items() if k not in LR_KEYS}
    return STRATEGIES[name](**kwargs)
