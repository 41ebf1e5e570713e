"""Eval's report: metrics from logits, the per-class table, the figures, temperature scaling, class names."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import compose_cfg, run_main, write_images

from visiontune.deploy.inference import check_class_names
from visiontune.deploy.session import InferenceSession
from visiontune.errors import UserError
from visiontune.eval import evaluate
from visiontune.eval import main as eval_main
from visiontune.evaluation import calibration, report
from visiontune.training.checkpoints import load_classifier

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ece_by_hand(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """Textbook ECE: bins [k/n, (k+1)/n), weight = share of images, |accuracy - mean confidence|."""
    confidence, predicted = probs.max(1)
    total = 0.0
    for k in range(n_bins + 1):  # confidence 1.0 falls in its own bin, as in torchmetrics
        inside = (confidence >= k / n_bins) & (confidence < (k + 1) / n_bins)
        if inside.any():
            gap = (predicted[inside] == targets[inside]).float().mean() - confidence[inside].mean()
            total += inside.float().mean().item() * abs(gap.item())
    return total


def test_metrics_agree_with_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 7, generator=gen) * 3
    targets = torch.randint(0, 7, (300,), generator=gen)
    m = calibration.classification_metrics(logits, targets, temperature=1.5)
    assert m["test/acc"] == pytest.approx((logits.argmax(1) == targets).float().mean().item(), abs=1e-7)
    top5 = logits.topk(5, dim=1).indices.eq(targets[:, None]).any(1).float().mean().item()
    assert m["test/top5"] == pytest.approx(top5, abs=1e-7)
    assert m["test/loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    probs = (logits / 1.5).softmax(1)
    nll = -probs[torch.arange(300), targets].log().mean().item()
    assert m["test/nll"] == pytest.approx(nll, rel=1e-5)
    assert m["test/ece"] == pytest.approx(ece_by_hand(probs, targets), abs=1e-6)
    rows = report.per_class_rows(report.confusion_matrix(logits.argmax(1), targets, 7), list("abcdefg"))
    assert m["test/macro_f1"] == pytest.approx(np.mean([r["f1"] for r in rows]), abs=1e-6)


def test_top5_is_left_out_below_five_classes():
    m = calibration.classification_metrics(torch.randn(10, 4), torch.randint(0, 4, (10,)))
    assert "test/top5" not in m and "test/acc" in m


def test_per_class_rows_from_a_known_confusion_matrix():
    predicted = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    cm = report.confusion_matrix(predicted, targets, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 2, 2], [1, 0, 1]]
    rows = {r["class"]: r for r in report.per_class_rows(cm, ["a", "b", "c"])}
    assert rows["a"]["support"] == 4 and rows["a"]["recall"] == pytest.approx(0.75)
    assert rows["a"]["precision"] == pytest.approx(3 / 4) and rows["a"]["confused_with"] == "b"
    assert rows["b"]["precision"] == pytest.approx(2 / 3) and rows["b"]["confused_with"] == "c"
    assert rows["b"]["confused_count"] == 2
    p, r = 1 / 3, 1 / 2
    assert rows["c"]["f1"] == pytest.approx(2 * p * r / (p + r))
    assert report.top_confusions(cm, ["a", "b", "c"], k=2) == [("b", "c", 2), ("a", "b", 1)]


def test_reliability_bins_count_every_image_once():
    probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [1.0, 0.0], [0.3, 0.7]])
    bins = calibration.reliability_bins(probs, torch.tensor([0, 1, 0, 1]), n_bins=10)
    assert sum(bins["count"]) == 4
    assert bins["count"][9] == 2 and bins["accuracy"][9] == 1.0  # 0.95 and 1.0 (the last bin)
    assert (
        bins["count"][5] == 1 and bins["accuracy"][5] == 0.0 and bins["confidence"][5] == pytest.approx(0.55)
    )


def test_temperature_scaling_lowers_the_nll_of_overconfident_logits():
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 5, (400,), generator=gen)
    honest = torch.randn(400, 5, generator=gen) + 1.5 * F.one_hot(targets, 5)
    loud = honest * 10
    t = calibration.fit_temperature(loud, targets)
    assert 5 < t < 20  # undoes most of the x10
    assert calibration.nll(loud, targets, t) < calibration.nll(loud, targets) - 0.5
    assert calibration.ece(loud, targets, t) < calibration.ece(loud, targets)
    # the fit is a minimum: nudging T either way is worse
    assert calibration.nll(loud, targets, t) <= min(calibration.nll(loud, targets, t * s) for s in (0.9, 1.1))


def test_class_names_are_compared_by_name():
    check_class_names(["a", "b"], ["a", "b"], allow=False)
    with pytest.raises(UserError, match=r"only in the checkpoint: \['b'\]; only in the data: \['x'\]"):
        check_class_names(["a", "b"], ["a", "x"], allow=False)
    with pytest.raises(UserError, match="another order"):
        check_class_names(["a", "b"], ["b", "a"], allow=False)
    check_class_names(["a", "b"], ["a", "x"], allow=True)
    with pytest.raises(UserError, match="3 classes, the checkpoint 2"):
        check_class_names(["a", "b"], ["a", "b", "c"], allow=True)


# -- on the tiny trained checkpoint
def eval_cfg(ckpt, out, *overrides):
    return compose_cfg([f"ckpt_path={ckpt}", *overrides], out, config_name="eval")


def test_eval_report_agrees_with_the_logits(tiny_checkpoint, tmp_path):
    metrics = evaluate(eval_cfg(tiny_checkpoint, tmp_path), patch={})
    trained = json.loads((tiny_checkpoint.parents[1] / "metrics.json").read_text())
    assert metrics["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(trained["test/loss"], abs=1e-5)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/acc", "test/top5", "test/macro_f1", "test/nll", "test/ece", "test/loss"):
        assert on_disk[key] == metrics[key]

    # the same numbers, straight from the model's logits
    session = InferenceSession.from_checkpoint(tiny_checkpoint, "cpu")
    model, datamodule = session.model, session.datamodule
    datamodule.setup("test")
    logits, targets, _ = session.collect(datamodule.test_set, batch_size=7)
    targets = targets["class"]
    predicted = logits.argmax(1)
    assert metrics["test/acc"] == pytest.approx((predicted == targets).float().mean().item(), abs=1e-6)
    with open(tmp_path / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == list(model.hparams.class_names)
    for c, row in enumerate(rows):
        support = int((targets == c).sum())
        assert int(row["support"]) == support
        recall = ((predicted == c) & (targets == c)).sum().item() / max(support, 1)
        assert float(row["recall"]) == pytest.approx(recall, abs=1e-4)
        wrong = predicted[(targets == c) & (predicted != c)]
        if len(wrong):
            counts = torch.bincount(wrong, minlength=10)
            assert int(row["confused_count"]) == counts.max().item()
            assert row["confused_with"] in [
                model.hparams.class_names[j] for j in torch.nonzero(counts == counts.max())
            ]
    cm = report.confusion_matrix(predicted, targets, 10)
    assert cm.sum() == len(targets) and np.trace(cm) == (predicted == targets).sum().item()

    for name in ("confusion_matrix.png", "reliability.png", "mistakes.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    text = (tmp_path / "report.md").read_text()
    for link in ("confusion_matrix.png", "reliability.png", "mistakes.png", "per_class.csv", "metrics.json"):
        assert f"]({link})" in text
    assert f"{metrics['test/acc']:.4f}" in text


def test_confusion_matrix_figure_scales_to_100_classes(tmp_path):
    names = [f"class_{i:03d}" for i in range(100)]
    cm = np.random.default_rng(0).integers(0, 5, (100, 100))
    report.plot_confusion(cm, names, tmp_path / "cm.png")
    from PIL import Image

    with Image.open(tmp_path / "cm.png") as image:
        assert image.width >= 4000 and image.height >= 2000  # ~0.2 inch (20 px) per class and panel


def overconfident_copy(ckpt, path, scale: float = 10.0):
    checkpoint = torch.load(ckpt, weights_only=True)
    for key in list(checkpoint["state_dict"]):
        if key.startswith("head."):
            checkpoint["state_dict"][key] = checkpoint["state_dict"][key] * scale
    torch.save(checkpoint, path)
    return path


def test_calibration_fits_a_temperature_and_writes_a_calibrated_copy(tiny_checkpoint, tmp_path):
    loud = overconfident_copy(tiny_checkpoint, tmp_path / "loud.ckpt")
    digest = hashlib.sha256(loud.read_bytes()).hexdigest()
    metrics = evaluate(eval_cfg(loud, tmp_path / "eval", "calibrate=true"), patch={})
    assert metrics["val/nll_after"] < metrics["val/nll_before"]
    assert metrics["temperature_fitted"] > 1  # the head was made 10x louder
    assert metrics["test/ece_after"] == pytest.approx(
        json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/ece_after"]
    )
    assert hashlib.sha256(loud.read_bytes()).hexdigest() == digest  # the input is never modified
    calibrated = load_classifier(tmp_path / "eval" / "calibrated.ckpt")
    assert calibrated.hparams.temperature == pytest.approx(metrics["temperature_fitted"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            calibrated.predict_proba(x),
            (load_classifier(loud)(x) / metrics["temperature_fitted"]).softmax(1),
            atol=1e-6,
        )
    assert "Temperature scaling" in (tmp_path / "eval" / "report.md").read_text()

    # evaluating the calibrated copy reports its NLL at the stored temperature
    again = evaluate(eval_cfg(tmp_path / "eval" / "calibrated.ckpt", tmp_path / "again"), patch={})
    assert again["temperature"] == pytest.approx(metrics["temperature_fitted"])
    assert again["test/nll"] == pytest.approx(metrics["test/nll_after"], rel=1e-5)
    assert again["test/acc"] == metrics["test/acc"]


def test_eval_names_the_classes_that_differ(tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / "other"
    for name in ("alpha", "beta", *[f"c{i}" for i in range(8)]):
        write_images(root / "train" / name, 1)
        write_images(root / "val" / name, 1)
        write_images(root / "test" / name, 1)
    args = [f"ckpt_path={tiny_checkpoint}", "data.name=imagefolder", f"data.root={root}"]
    args += ["data.train_subset=null", "data.val_subset=null", "data.test_subset=null"]
    code = run_main(eval_main, *args, f"hydra.run.dir={tmp_path / 'e1'}")
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error:") and "class names differ" in line, err[-2000:]
    assert "'alpha'" in line and "'Trouser'" in line and "Traceback" not in err
    assert (
        run_main(eval_main, *args, "data.allow_class_mismatch=true", f"hydra.run.dir={tmp_path / 'e2'}") == 0
    )
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["test/images"] == 10


def test_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    assert run_main(eval_main, f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'e'}") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "e" / "metrics.json").exists()
