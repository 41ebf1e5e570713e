"""ImageClassifier: a pretrained backbone (top removed) plus a new head.

Hyperparameters are plain values only (strings, numbers, lists, dicts of those), so checkpoints load
under `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.models.adapters import add_lora
from visiontune.models.backbones import Activations, create_backbone
from visiontune.models.heads import Head, build_head, head_probabilities, resolve_task
from visiontune.training import tasks
from visiontune.training.finetune import create_schedule, select_groups
from visiontune.training.param_groups import build_param_groups, describe_lrs
from visiontune.training.schedules import lr_factor, plateau_update

log = logging.getLogger(__name__)


OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(cfg: dict, groups: list[dict]) -> torch.optim.Optimizer:
    name = cfg["name"]
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9), nesterov=cfg.get("nesterov", False)
        )
    if name == "adam":  # L2 weight decay, added to the gradient
        return torch.optim.Adam(groups, lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))))
    if name == "adamw":  # decoupled weight decay
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))))
    raise ValueError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")


def _add_lora(backbone, finetune: dict) -> None:
    """finetune=lora: adapters (`lora.{r, alpha, dropout, target}`) in every group but those that
    `groups`/`pattern` name, as freeze_groups' keys do."""
    lora = dict(finetune.get("lora") or {})
    groups, pattern = finetune.get("groups"), finetune.get("pattern")
    skip = (
        select_groups([g.name for g in backbone.groups], groups, pattern)
        if groups is not None or pattern
        else set()
    )
    add_lora(
        backbone,
        lora.get("r", 8),
        lora.get("alpha", 16),
        lora.get("dropout", 0.0),
        lora.get("target", "auto"),
        skip,
    )


class ImageClassifier(L.LightningModule):
    """A pretrained backbone (top removed) and a new head, with its loss, metrics and optimizer.

    Arguments come in groups, as the config does: `model` (backbone, pretrained, head, label_smoothing,
    channels_last), `optim` (the optimizer, scheduler and finetune config groups), `data` (kept so
    that eval, predict and export rebuild the same preprocessing), `monitor` (the checkpoint's metric
    and mode, which scheduler=plateau follows). `class_names` are checked by eval and resume.
    `temperature` scales the logits of `predict_proba` and `predict_step` (set by calibration). `task`
    (None = multiclass) is a multilabel or multitask config with each head's classes. Every task is a
    list of heads (`self.heads`, the logits side by side); its loss and metrics are `self.objective`'s
    (training/tasks.py), whatever the task.

    The keyword-only arguments are the run's training extras, not saved in the hyperparameters (a
    checkpoint rebuilds the model without them): `mix` (batch MixUp/CutMix, `data.transforms.batch_mix`),
    `jsd_weight` (the AugMix consistency term's weight), `teacher` (a frozen `training.distill.Teacher`)
    and `distill` ({"alpha", "temperature"} of the distillation loss).
    """

    def __init__(
        self,
        model: dict,
        num_classes: int,
        class_names: list[str] | None = None,
        optim: dict | None = None,
        data: dict | None = None,
        monitor: dict | None = None,
        seed: int = 0,
        class_weights: list[float] | None = None,
        temperature: float = 1.0,
        task: dict | None = None,
        *,
        mix: nn.Module | None = None,
        jsd_weight: float = 0.0,
        teacher: nn.Module | None = None,
        distill: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["mix", "jsd_weight", "teacher", "distill"])
        head = model.get("head") or {}
        self.backbone = create_backbone(model["backbone"], model.get("pretrained", True))
        dropout, hidden = head.get("dropout", 0.0), head.get("hidden")
        # the full task: multiclass is one head over the class names (the checkpoint stores task None)
        self.task = resolve_task(task, class_names or [str(i) for i in range(num_classes)])
        self.head = build_head(self.task, self.backbone.num_features, dropout, hidden)
        optim = optim or {}
        self.optimizer_cfg = dict(
            optim.get("optimizer") or {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}
        )
        self.scheduler_cfg = dict(optim.get("scheduler") or {"name": "none"})
        finetune = dict(optim.get("finetune") or {"name": "full"})
        if finetune["name"] == "lora":  # the adapters are layers of the backbone, before anything reads it
            _add_lora(self.backbone, finetune)
        self.freeze_schedule = create_schedule(
            finetune, [g.name for g in self.backbone.groups], self.backbone
        )
        self.label_smoothing = float(model.get("label_smoothing", 0.0))
        self.channels_last = bool(model.get("channels_last", False))
        self.monitor = dict(monitor or {"monitor": "val/acc", "mode": "max"})
        self.mix = mix  # batch-level MixUp/CutMix (multiclass)
        # augment.jsd=true: weight of the AugMix Jensen-Shannon consistency term
        self.jsd_weight = float(jsd_weight)
        self.set_teacher(teacher, **(distill or {}))
        # data.balance=loss_weights: inverse class frequencies (mean 1) weight the training loss
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weights, persistent=False)
        if self.scheduler_cfg.get("name") == "plateau":
            # best monitored value, epochs without improvement, LR scale: saved with the weights
            self.register_buffer("plateau_state", torch.tensor([-math.inf, 0.0, 1.0], dtype=torch.float64))
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.objective = tasks.make_objective(self.task, self.label_smoothing)

    @property
    def heads(self) -> list[Head]:
        """The task's heads, in output order (one, `class`, for multiclass)."""
        return self.objective.heads

    def set_teacher(self, teacher: nn.Module | None, alpha: float = 0.5, temperature: float = 4.0) -> None:
        """Distil from a frozen `teacher` (visiontune.training.distill.Teacher); the constructor's
        `teacher` and `distill` arguments come here.

        The teacher is kept outside the module's submodules: it is not trained, not in the optimizer,
        not wrapped by DDP and not saved in the student's checkpoints; it follows the module's device.
        """
        object.__setattr__(self, "teacher", teacher)
        self.distill = {"alpha": float(alpha), "temperature": float(temperature)}

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    @property
    def lr(self) -> float:
        """The head LR (`optimizer.lr`); the LR finder sets it through this attribute."""
        return self.optimizer_cfg["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.optimizer_cfg["lr"] = float(value)
        # the stored hyperparameters keep their shape, so the checkpoint rebuilds this model
        self.hparams.optim = {**(self.hparams.optim or {}), "optimizer": dict(self.optimizer_cfg)}

    def train_every_layer(self) -> None:
        """From here on, fine-tune every layer, keeping the per-group LR keys (compress's fine-tune after
        pruning: the checkpoint's freeze strategy protected pretrained features that pruning changed)."""
        old = self.freeze_schedule
        self.freeze_schedule = create_schedule(
            {"name": "full", "backbone_lr_mult": old.backbone_lr_mult, "layer_decay": old.layer_decay},
            old.group_names,
        )

    def fit_head_to_backbone(self) -> None:
        """After the backbone's channels were pruned in place: it now hands the head as many features as
        the head's first layer takes (the pruner resized both together)."""
        first = next(m for m in self.head.modules() if isinstance(m, nn.Linear))
        self.backbone.num_features = first.in_features

    def forward(self, x: torch.Tensor | Activations) -> torch.Tensor:
        """The logits of a batch of images `(N, C, H, W)`, or of the backbone's own `Activations`.

        Activations (the frozen-feature cache's batches, visiontune.training.features) say where they
        come from: the backbone's features go to the head as they are, the output of its first steps
        runs through the rest of it (`Backbone.forward_from`). Anything else is refused.
        """
        if isinstance(x, Activations):
            a = x.tensor.to(self.dtype)  # a precision plugin converts the tensors of a batch, not these
            if x.start is None:
                return self.head(a)
            if self.channels_last and a.ndim == 4:
                a = a.contiguous(memory_format=torch.channels_last)
            return self.head(self.backbone.forward_from(a, x.start))
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            what = f"a {x.ndim}-D tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
            raise TypeError(
                f"ImageClassifier takes images (N, C, H, W) or Activations, not {what}; "
                "cached features come as Activations"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities, with the calibrated temperature applied (per head for a task)."""
        return self.probabilities(self(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Each head's probabilities at the stored temperature (`models.heads.head_probabilities`)."""
        return head_probabilities(logits, self.heads, self.hparams.temperature)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # `target` is class indices, or class probabilities after MixUp/CutMix.
        return F.cross_entropy(logits, target, weight=self.class_weight, label_smoothing=self.label_smoothing)

    def on_train_epoch_start(self) -> None:
        # Reseed per epoch (augmentation, shuffling of workers): resumed runs repeat the uninterrupted one.
        L.seed_everything(self.hparams.seed + self.current_epoch, workers=True, verbose=False)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Dropout and MixUp draw from a seed per optimizer step, so a resume replays them exactly.
        seed = self.hparams.seed * 1_000_003 + self.global_step
        if self.device.type == "cpu":  # the CPU generator alone: torch.manual_seed visits every backend
            torch.random.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)

    def on_validation_end(self) -> None:
        """scheduler=plateau: cut the LR by `factor` when the monitor stalls for more than `patience` epochs."""
        if not hasattr(self, "plateau_state") or self.trainer.sanity_checking:
            return
        name = self.monitor["monitor"]
        value = self.trainer.callback_metrics.get(name)
        if value is None:
            return
        sign = 1.0 if self.monitor.get("mode", "max") == "max" else -1.0  # plateau_update maximises
        cfg = self.scheduler_cfg
        best, bad, scale = self.plateau_state.tolist()
        best, bad, mult = plateau_update(
            best,
            int(bad),
            sign * float(value),
            cfg.get("patience", 2),
            cfg.get("factor", 0.1),
            cfg.get("threshold", 1e-4),
        )
        if mult != 1.0:
            log.info("%s stalled at %.4f: LR scale %.3g -> %.3g", name, sign * best, scale, scale * mult)
            for group in self.trainer.optimizers[0].param_groups:  # now, not at the next scheduler step
                group["lr"] *= mult
        self.plateau_state.copy_(torch.tensor([best, bad, scale * mult], dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        if batch is None:  # every file of the batch was unreadable (warned when it was loaded)
            return None
        x, y = batch
        return self.objective.training_loss(self, x, y)

    def _eval_step(self, batch, stage: str):
        if batch is None:
            return
        x, y = batch
        self.objective.eval_step(self, self(x), y, stage)

    def on_validation_epoch_end(self) -> None:  # multilabel threshold=auto tunes here, before the checkpoint
        self.objective.epoch_end(self, "val")

    def on_test_epoch_end(self) -> None:
        self.objective.epoch_end(self, "test")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        """Each head's probabilities at the stored temperature."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self.predict_proba(x)

    # -- optimisation
    def param_groups(self) -> list[dict]:
        backbone_groups = list(
            zip([g.name for g in self.backbone.groups], self.backbone.group_parameters(), strict=True)
        )
        return build_param_groups(
            backbone_groups,
            list(self.head.named_parameters()),
            lr=self.optimizer_cfg["lr"],
            weight_decay=self.optimizer_cfg.get("weight_decay", 0.0),
            backbone_lr_mult=self.freeze_schedule.backbone_lr_mult,
            layer_decay=self.freeze_schedule.layer_decay,
        )

    def configure_optimizers(self):
        groups = self.param_groups()
        optimizer = make_optimizer(self.optimizer_cfg, groups)
        sched = dict(self.scheduler_cfg)
        name = sched.pop("name", "none")
        total = int(self.trainer.estimated_stepping_batches)
        # optimizer steps in one epoch (not total / max_epochs: max_steps may be what ends the run)
        batches = self.trainer.num_training_batches
        steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        if not math.isfinite(batches):
            steps_per_epoch = total
        warmup = int(sched.pop("warmup_steps", 0) or 0) + int(sched.pop("warmup_epochs", 0) * steps_per_epoch)
        plateau = {k: sched.pop(k) for k in ("patience", "factor", "threshold") if k in sched}
        strategy = self.freeze_schedule

        def factor_for(group_index: int):
            # Plain closures: LambdaLR does not pickle functions into the checkpoint.
            def factor(step: int) -> float:
                f = lr_factor(step, name, total, steps_per_epoch, warmup_steps=warmup, **sched)
                f *= strategy.lr_gate(group_index, step, steps_per_epoch)
                if plateau:
                    f *= float(self.plateau_state[2])
                return f

            return factor

        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [factor_for(g["group_index"]) for g in groups]
        )
        log.info(
            "optimizer %s, schedule %s over %d steps (%d per epoch, warmup %d)",
            self.optimizer_cfg["name"],
            name,
            total,
            steps_per_epoch,
            warmup,
        )
        log.info("group LRs at step 0: %s", describe_lrs(optimizer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
