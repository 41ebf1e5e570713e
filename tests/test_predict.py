"""Predict: inputs of every kind, bad files as error rows (exit code 0), and the test split equal to eval's."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers import compose_cfg, run, run_main, write_images

from visiontune.data.images import open_image
from visiontune.deploy.session import InferenceSession, checkpoint_datamodule
from visiontune.errors import UserError
from visiontune.eval import evaluate
from visiontune.predict import main as predict_main
from visiontune.predict import predict, resolve_inputs
from visiontune.training.checkpoints import load_classifier


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_inputs_resolve_from_folders_globs_and_lists(tmp_path):
    a = write_images(tmp_path / "pics", 2)
    b = write_images(tmp_path / "pics" / "deeper", 2, suffix=".jpg", start=10)
    (tmp_path / "pics" / ".hidden.png").write_bytes(b"x")
    assert resolve_inputs(str(tmp_path / "pics")) == sorted(a + b)
    assert resolve_inputs(str(tmp_path / "pics" / "**" / "*.jpg")) == sorted(b)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\npics/{a[0].name}\n\n{b[0]}\n")
    assert resolve_inputs(str(listing)) == [tmp_path / "pics" / a[0].name, b[0]]
    assert resolve_inputs(str(a[1])) == [a[1]]
    with pytest.raises(UserError, match="does not exist"):
        resolve_inputs(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="matches no files"):
        resolve_inputs(str(tmp_path / "*.webp"))


def test_a_folder_with_broken_files_is_predicted_with_error_rows(tiny_checkpoint, tmp_path):
    folder = tmp_path / "new"
    good = write_images(folder, 3) + write_images(folder / "sub", 2, suffix=".jpg", start=3)
    truncated = folder / "cut.jpg"
    data = good[-1].read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 4])  # cut inside the scan data, headers intact
    (folder / "notes.txt").write_text("not an image")
    result = run(
        "visiontune.predict",
        f"ckpt_path={tiny_checkpoint}",
        f"inputs={folder}",
        f"hydra.run.dir={tmp_path / 'p'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["path"]: row for row in read_rows(tmp_path / "p" / "predictions.csv")}
    assert set(rows) == {str(p) for p in [*good, truncated, folder / "notes.txt"]}
    assert (
        rows[str(truncated)]["error"].startswith(("unreadable", "truncated"))
        and rows[str(truncated)]["label"] == ""
    )
    assert "not an image" in rows[str(folder / "notes.txt")]["error"]

    # every good image has the label and top-k probabilities of the model itself
    model = load_classifier(tiny_checkpoint)
    transform = checkpoint_datamodule(model).eval_transform()
    names = model.hparams.class_names
    with torch.no_grad():
        probs = model.predict_proba(torch.stack([transform(open_image(p)) for p in good]))
    for path, p in zip(good, probs, strict=True):
        row = rows[str(path)]
        assert row["error"] == ""
        assert row["label"] == names[int(p.argmax())] == row["top1_label"]
        assert float(row["prob"]) == pytest.approx(float(p.max()), abs=1e-6)
        top = p.topk(5)
        assert [row[f"top{r}_label"] for r in range(1, 6)] == [names[int(i)] for i in top.indices]
        assert float(row["top5_prob"]) == pytest.approx(float(top.values[4]), abs=1e-6)


def test_the_test_split_reproduces_eval(tiny_checkpoint, tmp_path):
    metrics = evaluate(
        compose_cfg([f"ckpt_path={tiny_checkpoint}", "report.enabled=false"], tmp_path / "e", "eval"),
        patch={},
    )
    cfg = compose_cfg([f"ckpt_path={tiny_checkpoint}", "inputs=split:test"], tmp_path / "p", "predict")
    summary = predict(cfg, patch={})
    rows = read_rows(tmp_path / "p" / "predictions.csv")
    assert len(rows) == metrics["test/images"] and all(r["error"] == "" for r in rows)
    assert summary["test/acc"] == metrics["test/acc"]
    assert sum(int(r["correct"]) for r in rows) / len(rows) == metrics["test/acc"]
    assert all(int(r["correct"]) == (r["label"] == r["target"]) for r in rows)
    assert rows[0]["path"] == "test[0]"


def test_flip_tta_averages_the_image_and_its_mirror(tiny_checkpoint):
    model = load_classifier(tiny_checkpoint)
    session = InferenceSession.from_checkpoint(tiny_checkpoint, "cpu")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = (model.predict_proba(x) + model.predict_proba(x.flip(-1))) / 2
    assert torch.allclose(session.predict_batch(x, "flip"), expected, atol=1e-6)
    assert not torch.allclose(session.predict_batch(x, "none"), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inputs=/nonexistent/pics"], "/nonexistent/pics does not exist"),
        (["inputs=split:train"], "split:test and split:val"),
        (["inputs=.", "ckpt_path=/nonexistent/best.ckpt"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tiny_checkpoint, tmp_path, capsys):
    code = run_main(predict_main, f"ckpt_path={tiny_checkpoint}", *args, f"hydra.run.dir={tmp_path / 'p'}")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error:") and message in last and "Traceback" not in err
    assert not (tmp_path / "p" / "predictions.csv").exists()
