"""Tasks (models/heads.py, training/tasks.py, deploy/outputs.py): losses and metrics against direct formulas, threshold tuning, uncertainty weights,
the multilabel / multitask CSV formats and their bad-input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import compose_cfg, run_main

from visiontune.build import build_datamodule
from visiontune.config import validate_config
from visiontune.data.files import read_task_csv, scan_task_csv, task_classes
from visiontune.deploy import outputs
from visiontune.errors import UserError
from visiontune.models import heads as H
from visiontune.train import main as train_main
from visiontune.training import tasks
from visiontune.training.module import ImageClassifier


def head(name, kind, classes, start=0, **kw):
    return H.Head(name, kind, tuple(classes), start, **kw)


def average_precision(scores: list[float], relevant: list[int]) -> float:
    """AP straight from its definition: the mean of precision@k over the ranks k of the positives."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for k, i in enumerate(order, start=1):
        if relevant[i]:
            hits += 1
            precisions.append(hits / k)
    return sum(precisions) / len(precisions)


# -- losses
def test_masked_bce_is_the_bce_formula_over_known_entries_with_pos_weight():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.8, -2.0]])
    target = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])  # one missing entry
    pos_weight = torch.tensor([3.0, 1.0, 0.5])
    sig = torch.sigmoid(logits)
    terms = -(pos_weight * target * torch.log(sig) + (1 - target) * torch.log(1 - sig))
    known = target != -1
    expected = terms[known].mean()
    assert tasks.masked_bce(logits, target, pos_weight) == pytest.approx(float(expected), rel=1e-6)
    plain = F.binary_cross_entropy_with_logits(logits[1], target[1])
    assert tasks.masked_bce(logits[1:], target[1:]) == pytest.approx(float(plain), rel=1e-6)


def test_a_missing_label_drops_out_of_its_heads_loss_only():
    """Image 1 has no class label: the class head's loss is image 0's alone; the group head uses both."""
    heads = [head("class", "multiclass", "abc", 0), head("group", "multiclass", "xy", 3, weight=0.5)]
    logits = torch.tensor([[1.0, 2.0, 0.5, 0.3, -0.2], [0.1, -1.0, 2.0, 1.5, 0.0]], requires_grad=True)
    targets = {"class": torch.tensor([1, -1]), "group": torch.tensor([0, 1])}
    losses = tasks.head_losses(logits, targets, heads)
    class_loss = -torch.log_softmax(logits[0, :3], -1)[1]
    group_loss = -(torch.log_softmax(logits[0, 3:], -1)[0] + torch.log_softmax(logits[1, 3:], -1)[1]) / 2
    assert float(losses["class"].detach()) == pytest.approx(float(class_loss.detach()), rel=1e-6)
    assert float(losses["group"].detach()) == pytest.approx(float(group_loss.detach()), rel=1e-6)
    total = tasks.combine_losses(losses, heads)
    assert float(total.detach()) == pytest.approx(float((class_loss + 0.5 * group_loss).detach()), rel=1e-6)
    total.backward()
    assert torch.all(logits.grad[1, :3] == 0) and torch.any(logits.grad[1, 3:] != 0)
    # a batch where no image has the head's label: loss 0, still part of the graph (DDP sees every head)
    none = tasks.head_losses(logits, {"class": torch.tensor([-1, -1]), "group": targets["group"]}, heads)
    assert float(none["class"]) == 0.0 and none["class"].requires_grad


# -- metrics
def test_map_and_f1_match_their_definitions_on_a_known_ranking():
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.65], [0.7, 0.4], [0.6, 0.95], [0.3, 0.1]])  # no ties
    target = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [0, 0]])
    ap0 = average_precision(probs[:, 0].tolist(), target[:, 0].tolist())  # (1 + 2/3) / 2
    ap1 = average_precision(probs[:, 1].tolist(), target[:, 1].tolist())  # (1 + 1) / 2
    assert ap0 == pytest.approx(5 / 6) and ap1 == pytest.approx(1.0)
    micro = average_precision(probs.flatten().tolist(), target.flatten().tolist())
    thresholds = torch.tensor([0.75, 0.5])
    scores = tasks.multilabel_scores(probs, target.float(), thresholds)
    assert scores["ap"] == pytest.approx([ap0, ap1])
    assert scores["map"] == pytest.approx((ap0 + ap1) / 2)
    assert scores["map_micro"] == pytest.approx(micro)
    # F1 at the thresholds: label 0 predicts rows 0, 1 (tp 1, fp 1, fn 1); label 1 rows 1, 3 (tp 2)
    f1_0, f1_1 = 2 * 1 / (2 * 1 + 1 + 1), 1.0
    assert scores["f1"] == pytest.approx((f1_0 + f1_1) / 2)


def test_map_leaves_out_labels_without_positives_and_missing_entries():
    probs = torch.tensor([[0.9, 0.5, 0.2], [0.1, 0.6, 0.3], [0.4, 0.7, 0.8]])
    target = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    scores = tasks.multilabel_scores(probs, target, torch.full((3,), 0.5))
    assert math.isnan(scores["ap"][1])  # no positive: no AP, and not a 0 in the mean
    ap2 = average_precision([0.3, 0.8], [1, 0])  # the missing entry (row 0) is left out
    assert scores["ap"][2] == pytest.approx(ap2)
    assert scores["map"] == pytest.approx((1.0 + ap2) / 2)


def test_head_scores_name_each_heads_metrics_and_their_mean():
    heads = H.task_heads(
        {"name": "multitask", "heads": [
            {"name": "class", "kind": "multiclass", "classes": ["a", "b"]},
            {"name": "tags", "kind": "multilabel", "classes": ["x", "y"]},
        ]}
    )  # fmt: skip
    logits = torch.tensor([[2.0, 0.0, 3.0, -3.0], [0.0, 2.0, -3.0, 3.0], [2.0, 0.0, 3.0, 3.0]])
    targets = {"class": torch.tensor([0, 0, -1]), "tags": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}
    out = tasks.head_scores(logits, targets, heads, torch.full((4,), 0.5), "test", per_label=True)
    assert out["test/class/acc"] == pytest.approx(0.5)  # image 2 has no class label
    assert out["test/tags/map"] == pytest.approx(1.0) and out["test/tags/f1"] == pytest.approx(1.0)
    assert out["test/score"] == pytest.approx(0.75)
    assert out["test/tags/ap/x"] == pytest.approx(1.0)
    single = H.task_heads(
        {"name": "multilabel", "heads": [{"name": "labels", "kind": "multilabel", "classes": ["x", "y"]}]}
    )
    out = tasks.head_scores(logits[:, 2:], {"labels": targets["tags"]}, single, torch.full((2,), 0.5), "val")
    assert set(out) == {"val/loss", "val/map", "val/map_micro", "val/f1"}


def test_threshold_tuning_improves_f1_on_a_constructed_case():
    """Label 0's positives score 0.30-0.45 and its negatives 0.05-0.25: nothing passes 0.5 (F1 0);
    the tuned threshold separates them (F1 1). Label 1 has no positive and keeps the default."""
    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(0.30, 0.45, 20), rng.uniform(0.05, 0.25, 60)
    probs = torch.tensor(
        np.stack([np.concatenate([pos, neg]), rng.uniform(0, 1, 80)], 1), dtype=torch.float32
    )
    target = torch.zeros(80, 2)
    target[:20, 0] = 1
    before = tasks.multilabel_scores(probs[:, :1], target[:, :1], torch.tensor([0.5]))["f1"]
    tuned = tasks.tune_thresholds(probs, target)
    after = tasks.multilabel_scores(probs[:, :1], target[:, :1], tuned[:1])["f1"]
    assert before == 0.0 and after == pytest.approx(1.0)
    assert neg.max() < tuned[0] < pos.min() and tuned[1] == 0.5


def test_tuned_thresholds_change_only_multilabel_heads():
    heads = [head("c", "multiclass", "ab", 0), head("t", "multilabel", "xy", 2)]
    logits = torch.tensor([[5.0, 0.0, -1.0, 2.0], [0.0, 5.0, -3.0, -2.0]])
    out = tasks.tuned_thresholds(logits, {"c": torch.tensor([0, 1]), "t": torch.tensor([[1.0, 1.0], [0.0, 0.0]])},
                                 heads, torch.full((4,), 0.5))  # fmt: skip
    assert out[:2].tolist() == [0.5, 0.5]
    s = torch.sigmoid(logits[:, 2:])
    assert out[2] == pytest.approx(float(s[:, 0].mean())) and out[3] == pytest.approx(float(s[:, 1].mean()))


def test_probabilities_are_a_softmax_per_multiclass_head_and_a_sigmoid_per_label():
    heads = [head("c", "multiclass", "abc", 0), head("t", "multilabel", "xy", 3)]
    logits = torch.randn(4, 5)
    p = H.head_probabilities(logits, heads, temperature=2.0)
    assert torch.allclose(p[:, :3], (logits[:, :3] / 2).softmax(-1))
    assert torch.allclose(p[:, 3:], logits[:, 3:].sigmoid())


# -- uncertainty weighting
def multitask_model(weighting: str) -> ImageClassifier:
    task = {"name": "multitask", "loss_weighting": weighting, "threshold": 0.5, "heads": [
        {"name": "a", "kind": "multiclass", "classes": ["0", "1", "2"], "weight": 1.0},
        {"name": "b", "kind": "multilabel", "classes": ["x", "y"], "weight": 1.0},
    ]}  # fmt: skip
    return ImageClassifier(model={"backbone": "resnet18", "pretrained": False}, num_classes=5,
                           optim={"optimizer": {"name": "sgd", "lr": 0.1}}, task=task)  # fmt: skip


def test_uncertainty_weights_are_learnable_in_the_optimizer_and_saved():
    s = torch.tensor([0.5, -0.2], requires_grad=True)
    heads = [head("a", "multiclass", "ab"), head("b", "multiclass", "ab", 2)]
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    total = tasks.combine_losses(losses, heads, s)  # sum exp(-s) L + s / 2
    expected = math.exp(-0.5) * 2.0 + 0.25 + math.exp(0.2) * 0.5 - 0.1
    assert float(total) == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert s.grad.tolist() == pytest.approx([-math.exp(-0.5) * 2.0 + 0.5, -math.exp(0.2) * 0.5 + 0.5])

    model = multitask_model("uncertainty")
    log_vars = model.head.log_vars
    assert log_vars.requires_grad and log_vars.shape == (2,)
    grouped = [p for g in model.param_groups() for p in g["params"]]
    assert any(p is log_vars for p in grouped)
    group = next(g for g in model.param_groups() if any(p is log_vars for p in g["params"]))
    assert group["weight_decay"] == 0.0  # no decay pulls the weights to 1
    optimizer = torch.optim.SGD(model.param_groups(), lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    targets = {
        "a": torch.tensor([0, 1, 2, -1]),
        "b": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
    }
    loss = tasks.combine_losses(tasks.head_losses(model(x), targets, model.objective.heads), model.objective.heads,
                                model.head.log_vars)  # fmt: skip
    loss.backward()
    optimizer.step()
    assert torch.all(model.head.log_vars.detach() != 0)
    state = model.state_dict()
    assert torch.equal(state["head.log_vars"], model.head.log_vars.detach())
    fresh = multitask_model("uncertainty")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.head.log_vars, model.head.log_vars)
    assert multitask_model("fixed").head.log_vars is None


def test_a_multiclass_model_is_a_task_with_one_head_and_keeps_its_checkpoint_layout():
    model = ImageClassifier(model={"backbone": "resnet18", "pretrained": False}, num_classes=4,
                            class_names=list("abcd"), mix=torch.nn.Identity(), jsd_weight=2.0,
                            distill={"alpha": 0.3, "temperature": 2.0})  # fmt: skip
    assert model.hparams.task is None  # as every multiclass checkpoint stores it
    assert [(h.name, h.kind, h.classes, h.start, h.stop) for h in model.heads] == [
        ("class", "multiclass", ("a", "b", "c", "d"), 0, 4)
    ]
    assert isinstance(model.objective, tasks.Classification)
    # the training extras are the run's, not the checkpoint's
    assert not {"mix", "jsd_weight", "teacher", "distill"} & set(model.hparams)
    assert model.jsd_weight == 2.0 and model.distill == {"alpha": 0.3, "temperature": 2.0}
    assert [k for k in model.state_dict() if not k.startswith("backbone.")] == [
        "head.0.weight",
        "head.0.bias",
    ]


# -- predictions as plain values
def test_prediction_cells_and_serve_answers_use_the_thresholds():
    spec = {"name": "multitask", "heads": [
        {"name": "c", "kind": "multiclass", "classes": ["a", "b"], "start": 0, "stop": 2},
        {"name": "t", "kind": "multilabel", "classes": ["x", "y", "z"], "start": 2, "stop": 5,
         "thresholds": [0.5, 0.9, 0.2]},
    ]}  # fmt: skip
    probs = [0.3, 0.7, 0.6, 0.8, 0.25]
    cells = outputs.prediction_cells(probs, spec)
    assert cells == {"c/label": "b", "c/prob": "0.700000", "t/labels": "x|z", "t/probs": "0.600000|0.250000"}
    target = outputs.target_cells({"c": 1, "t": torch.tensor([1.0, 0.0, 1.0])}, spec, cells)
    assert target == {"c/target": "b", "c/correct": 1, "t/target": "x|z", "t/correct": 1}
    missing = outputs.target_cells({"c": -1, "t": torch.tensor([-1.0, -1.0, -1.0])}, spec, cells)
    assert missing == {}
    answer = outputs.describe(probs, spec, topk=2)["heads"]
    assert answer["c"]["label"] == "b" and [t["label"] for t in answer["c"]["topk"]] == ["b", "a"]
    assert [x["label"] for x in answer["t"]["labels"]] == ["x", "z"]
    assert outputs.head_columns(spec, True) == ["c/label", "c/prob", "c/target", "c/correct",
                                              "t/labels", "t/probs", "t/target", "t/correct"]  # fmt: skip


# -- CSV formats and bad input
def write_csv(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def image_files(folder, n):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")


def test_multilabel_csv_separated_and_0_1_columns_give_the_same_targets(tmp_path):
    image_files(tmp_path, 3)
    sep = write_csv(tmp_path / "sep.csv", "path,labels\n0.png,cat|dog\n1.png,\n2.png,dog\n")
    cols = write_csv(tmp_path / "cols.csv", "path,cat,dog\n0.png,1,1\n1.png,0,0\n2.png,0,1\n")
    heads = H.config_heads({"name": "multilabel"})
    for path in (sep, cols):
        resolved = task_classes(path, heads, "|", multitask=False)
        assert resolved[0]["classes"] == ["cat", "dog"]
        paths, targets = scan_task_csv(path, True, resolved, "|", multitask=False)
        assert [t["labels"].tolist() for t in targets] == [[1, 1], [0, 0], [0, 1]]
        assert paths[0].endswith("0.png")
    semicolon = write_csv(tmp_path / "semi.csv", "path,labels\n0.png,cat;dog\n")
    assert read_task_csv(semicolon, heads, ";", multitask=False)[1]["labels"] == [["cat", "dog"]]


def test_multitask_csv_reads_columns_by_header_and_empty_cells_are_missing(tmp_path):
    image_files(tmp_path, 3)
    path = write_csv(tmp_path / "t.csv", "path,group,class,tags\n0.png,g1,a,x|y\n1.png,g2,,\n2.png,g1,b,y\n")
    heads = [{"name": "cls", "column": "class", "kind": "multiclass"}, {"name": "group", "kind": "multiclass"},
             {"name": "tags", "kind": "multilabel"}]  # fmt: skip
    resolved = task_classes(path, heads, "|", multitask=True)
    assert [h["classes"] for h in resolved] == [["a", "b"], ["g1", "g2"], ["x", "y"]]
    _, targets = scan_task_csv(path, True, resolved, "|", multitask=True)
    assert [int(t["cls"]) for t in targets] == [0, -1, 1]
    assert [int(t["group"]) for t in targets] == [0, 1, 0]
    assert targets[1]["tags"].tolist() == [-1, -1] and targets[2]["tags"].tolist() == [0, 1]


def test_bad_task_csvs_are_one_line_user_errors(tmp_path):
    image_files(tmp_path, 2)
    train = write_csv(tmp_path / "train.csv", "path,digit,parity\n0.png,1,odd\n1.png,2,\n")
    heads = [{"name": "digit", "kind": "multiclass"}, {"name": "parity", "kind": "multiclass"}]
    resolved = task_classes(train, heads, "|", multitask=True)
    test = write_csv(tmp_path / "test.csv", "path,digit,parity\n0.png,7,odd\n")
    with pytest.raises(UserError, match=r"labels of head digit that are not in the training CSV: \['7'\]"):
        scan_task_csv(test, True, resolved, "|", multitask=True)
    with pytest.raises(
        UserError, match=r"no column 'colour' for head colour; its columns are \['digit', 'parity'\]"
    ):
        task_classes(train, [{"name": "colour", "kind": "multiclass"}], "|", multitask=True)
    empty = write_csv(tmp_path / "empty.csv", "path,digit,parity\n0.png,1,\n1.png,2,\n")
    with pytest.raises(UserError, match="head parity .* has no labels at all"):
        task_classes(empty, heads, "|", multitask=True)
    labels = write_csv(tmp_path / "ml.csv", "path,labels\n0.png,\n1.png,\n")
    with pytest.raises(UserError, match="has no labels at all"):
        task_classes(labels, H.config_heads({"name": "multilabel"}), "|", multitask=False)


HEADS = "task.heads=[{name: digit, column: digit, kind: multiclass, weight: 1.0}, {name: parity, column: parity, kind: multiclass, weight: 0.5}]"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=multitask", "task.heads=[{name: a, kind: ordinal}]"], "kind: multiclass, multilabel"),
        (["task=multitask"], "without task.heads"),
        (["task=multilabel", "augment=mixup"], r"augment.mixup_alpha=0.2"),
        (["task=multilabel", "distill.teacher=x.ckpt"], "distill.teacher"),
        (["task=multilabel", "data.balance=sampler"], "data.balance=sampler"),
        (
            ["task=multilabel", "task.threshold=1.5"],
            r"task.threshold=1.5: must be a number in \(0, 1\), or auto",
        ),
        (["task=multilabel", "task.loss_weighting=uncertainty"], "fixed unless task=multitask"),
        (["task=multitask", HEADS.replace("parity, column", "digit, column")], "distinct names"),
    ],
)
def test_task_configs_that_make_no_sense_are_refused(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        validate_config(compose_cfg(overrides, tmp_path))


def test_multilabel_with_image_folders_points_to_the_csv_form(tmp_path):
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    cfg = compose_cfg(["task=multilabel", "data=imagefolder", f"data.root={tmp_path / 'ds'}"], tmp_path)
    with pytest.raises(
        UserError, match=r"image folders cannot express several labels.*data=csv.*path,labels"
    ):
        build_datamodule(cfg)
    with pytest.raises(UserError, match="its labels come from a CSV"):
        build_datamodule(compose_cfg(["task=multilabel"], tmp_path))


def test_bad_task_input_on_the_command_line_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = run_main(train_main, "task=multitask", "task.heads=[{name: a, kind: ordinal}]",
                    f"hydra.run.dir={tmp_path}")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err[-2000:]
    assert "kind: multiclass, multilabel" in err
