"""Knowledge distillation (distill.teacher=<ckpt>) and the AugMix JSD term: formulas, teacher, runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import FAST, compose_cfg, run, run_main

from visiontune.errors import UserError
from visiontune.train import main as train_main
from visiontune.training.checkpoints import load_checkpoint, load_classifier
from visiontune.training.distill import Teacher, load_teacher
from visiontune.training.losses import distillation_loss, jsd_consistency


def test_distillation_loss_equals_the_formula_on_a_hand_made_batch():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, -2.0, 4.0]])
    target = torch.tensor([0, 2])
    alpha, t = 0.7, 3.0
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        q = [math.exp(v / t) for v in s_row]
        p = [math.exp(v / t) for v in t_row]
        q, p = [v / sum(q) for v in q], [v / sum(p) for v in p]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    kl /= 2
    ce = -sum(math.log(math.exp(r[c]) / sum(math.exp(v) for v in r)) for r, c in zip(student.tolist(), target.tolist(), strict=True)) / 2  # fmt: skip
    expected = alpha * kl * t * t + (1 - alpha) * ce
    got = distillation_loss(student, teacher, torch.nn.functional.cross_entropy(student, target), alpha, t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # alpha=0 is plain cross-entropy; a student equal to its teacher has no soft loss
    assert distillation_loss(student, teacher, torch.tensor(1.25), 0.0, t).item() == pytest.approx(1.25)
    assert distillation_loss(teacher, teacher, torch.tensor(0.0), 1.0, t).item() == pytest.approx(
        0.0, abs=1e-7
    )


def test_jsd_consistency_equals_the_formula_and_vanishes_for_equal_views():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])  # one image, three views
    p = logits[0].softmax(-1).tolist()
    m = [sum(v[k] for v in p) / 3 for k in range(2)]
    expected = sum(sum(v[k] * math.log(v[k] / m[k]) for k in range(2)) for v in p) / 3
    assert jsd_consistency(logits).item() == pytest.approx(expected, rel=1e-5)
    same = torch.tensor([[1.0, -1.0, 0.5]]).repeat(4, 3, 1)
    assert jsd_consistency(same).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_sees_the_pixels_through_its_own_normalisation_and_size():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean((2, 3))

    pixels = torch.rand(2, 3, 16, 16)
    s_mean, s_std, t_mean, t_std = (
        (0.5, 0.4, 0.3),
        (0.2, 0.25, 0.3),
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    student_x = (pixels - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    teacher = Teacher(Probe(), (s_mean, s_std), (t_mean, t_std), size=None)
    teacher(student_x)
    want = (pixels - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["x"], want, atol=1e-5, rtol=1e-5)
    Teacher(Probe(), (s_mean, s_std), (t_mean, t_std), size=24)(student_x)
    assert seen["x"].shape == (2, 3, 24, 24)


def test_teacher_with_other_classes_is_refused(tiny_checkpoint):
    with pytest.raises(UserError, match="distill.teacher=.*10 classes.*this run's data has 3"):
        load_teacher(str(tiny_checkpoint), ["a", "b", "c"], ((0.5,) * 3, (0.5,) * 3), 32)


def test_teacher_is_frozen_in_eval_mode_and_not_part_of_the_student(tiny_checkpoint):
    from visiontune.training.module import ImageClassifier

    hparams = load_checkpoint(tiny_checkpoint)["hyper_parameters"]
    teacher = load_teacher(str(tiny_checkpoint), hparams["class_names"], ((0.5,) * 3, (0.5,) * 3), 32)
    keys = set(load_classifier(tiny_checkpoint).state_dict())
    student = ImageClassifier(
        **{**hparams, "model": {**hparams["model"], "pretrained": False}},
        teacher=teacher,
        distill={"alpha": 0.3, "temperature": 2.0},
    )
    assert student.teacher is teacher and student.distill == {"alpha": 0.3, "temperature": 2.0}
    student.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert set(student.state_dict()) == keys  # the student's checkpoints stay loadable alone
    assert not any(p is q for p in student.parameters() for q in teacher.parameters())


def distill_cfg(teacher, out, *extra):
    # scheduler=none: the LR does not depend on max_epochs, so a 1-epoch run can be resumed to 2
    return compose_cfg(
        [*FAST, f"distill.teacher={teacher}", "distill.alpha=0.6", "logger=csv", "scheduler=none", *extra],
        out,
    )


def test_distilled_run_trains_and_resumes_exactly(tiny_checkpoint, tmp_path):
    from visiontune.train import train

    teacher_bytes = tiny_checkpoint.read_bytes()
    train(distill_cfg(tiny_checkpoint, tmp_path / "full", "trainer.max_epochs=2"))
    train(distill_cfg(tiny_checkpoint, tmp_path / "half", "trainer.max_epochs=1"))
    half = tmp_path / "half" / "checkpoints" / "last.ckpt"
    train(distill_cfg(tiny_checkpoint, tmp_path / "half", "trainer.max_epochs=2", f"ckpt_path={half}"))
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    resumed = load_checkpoint(tmp_path / "half" / "checkpoints" / "last.ckpt")["state_dict"]
    assert full.keys() == resumed.keys() and not any(k.startswith("teacher") for k in full)
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)
    # the teacher pulls: the same run without it ends elsewhere
    train(compose_cfg([*FAST, "logger=csv", "scheduler=none", "trainer.max_epochs=2"], tmp_path / "alone"))
    alone = load_checkpoint(tmp_path / "alone" / "checkpoints" / "last.ckpt")["state_dict"]
    head = next(k for k in full if k.startswith("head.") and k.endswith("weight"))
    assert not torch.equal(alone[head], full[head])
    assert tiny_checkpoint.read_bytes() == teacher_bytes
    assert "test/acc" in json.loads((tmp_path / "full" / "metrics.json").read_text())


def test_distillation_under_ddp(tiny_checkpoint, tmp_path):
    result = run(
        "visiontune.train", *FAST, "trainer=ddp_cpu", f"distill.teacher={tiny_checkpoint}",
        f"hydra.run.dir={tmp_path / 'ddp'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.alpha=1.5", "distill.alpha=1.5"),
        ("distill.temperature=0", "distill.temperature=0"),
        ("distill.teacher=/nonexistent/teacher.ckpt", "/nonexistent/teacher.ckpt"),
    ],
)
def test_bad_distillation_settings_are_one_line(override, message, tmp_path, capsys):
    code = run_main(train_main, *FAST, override, f"hydra.run.dir={tmp_path / 'bad'}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
