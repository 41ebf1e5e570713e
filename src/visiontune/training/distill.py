"""Knowledge distillation: a trained checkpoint as a frozen teacher for the run's (student) model.

`python -m visiontune.train distill.teacher=<ckpt>` trains the configured backbone with
`alpha * KL(student/T, teacher/T) * T^2 + (1 - alpha) * CE` (visiontune.training.losses.distillation_loss).
The teacher is loaded with weights_only=True, kept in eval mode with gradients off, and is not part
of the student's state_dict, so the student's checkpoints load like any other.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.errors import UserError
from visiontune.models.backbones import backbone_data_config
from visiontune.training.checkpoints import load_classifier

log = logging.getLogger(__name__)


class Teacher(nn.Module):
    """A frozen classifier that sees the student's batch through its own preprocessing.

    The student's batch is already normalised with the student's mean/std at the student's size; it
    is mapped back to pixel values, normalised with the teacher's mean/std and resized to the
    teacher's input size, so a teacher trained at 64 px with ImageNet statistics can teach a
    student at 32 px with other statistics.
    """

    def __init__(self, model: nn.Module, student_norm: tuple, teacher_norm: tuple, size: int | None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        (s_mean, s_std), (t_mean, t_std) = student_norm, teacher_norm
        self.register_buffer("scale", torch.tensor(s_std) / torch.tensor(t_std))
        self.register_buffer("shift", (torch.tensor(s_mean) - torch.tensor(t_mean)) / torch.tensor(t_std))
        self.size = size  # None = the student's size is the teacher's
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always eval: BatchNorm statistics and dropout stay fixed

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
            )
        return self.model(x)


def load_teacher(ckpt_path: str, class_names: list[str], student_norm: tuple, student_size: int) -> Teacher:
    """The teacher checkpoint as a frozen Teacher; refused unless it knows the run's classes in order.

    Loading draws nothing from the global RNG (the random init it overwrites would), so the student
    built after it starts from the weights it would have without a teacher.
    """
    with torch.random.fork_rng(devices=[]):
        model = load_classifier(ckpt_path)
    theirs = list(model.hparams.get("class_names") or [])
    if theirs != list(class_names):
        raise UserError(
            f"distill.teacher={ckpt_path} was trained on {len(theirs)} classes ({', '.join(theirs[:4])}"
            f"{', ...' if len(theirs) > 4 else ''}), this run's data has {len(class_names)} "
            f"({', '.join(list(class_names)[:4])}{', ...' if len(class_names) > 4 else ''}). "
            "Use a teacher trained on the same classes"
        )
    mean, std, size = input_spec(model)
    log.info(
        "distillation: teacher %s (%s at %d px, %d classes)",
        ckpt_path, model.hparams.model["backbone"], size, len(theirs),
    )  # fmt: skip
    return Teacher(model, student_norm, (mean, std), size if size != student_size else None)


def input_spec(model) -> tuple[tuple, tuple, int]:
    """A trained model's input normalisation and size, from its stored data config (its data need not exist)."""
    data, pretrained = model.hparams.data or {}, backbone_data_config(model.hparams.model["backbone"])
    mean = tuple(data.get("mean") or pretrained["mean"])
    std = tuple(data.get("std") or pretrained["std"])
    return mean, std, int(data.get("image_size") or pretrained["input_size"][-1])
