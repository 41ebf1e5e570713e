"""`python -m visiontune.predict ckpt_path=PATH inputs=WHAT [topk=5] [tta=flip]`: label images, write predictions.csv.

WHAT is an image file, a folder (searched recursively), a glob (`'shots/**/*.jpg'`), a text file of
paths (.txt/.lst, one a line, relative to the file's folder, `#` comments), or `split:test` /
`split:val`: that split of the checkpoint's own data, with `target` and `correct` columns (its
accuracy is eval's test/acc exactly: the same images through the same transform and model).

A file that is not a readable image becomes a row with the reason in `error`; the other files are
still predicted and the exit code is 0. Probabilities are softmax(logits / temperature) with the
checkpoint's temperature (eval calibrate=true stores one).

A multilabel or multitask checkpoint writes one column group per head instead: `label,prob` for a
multiclass head, `labels,probs` (the labels at or above their thresholds, `|`-separated, most probable
first) for a multilabel one, named `<head>/label` etc. for multitask (plus `target,correct` for a split;
for a multilabel head `correct` means the exact set).
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from visiontune.build import checkpoint_datamodule, load_classifier
from visiontune.cli import CONF_DIR, print_summary, run_cli
from visiontune.data.files import IMAGE_EXTENSIONS, check_image
from visiontune.data.images import open_image
from visiontune.deploy import outputs
from visiontune.deploy.inference import (
    Indexed,
    check_class_names,
    cli_data_patch,
    item_name,
    pick_device,
    quiet_warnings,
    temperature_of,
)
from visiontune.errors import UserError
from visiontune.evaluation.calibration import scaled_probs
from visiontune.models import heads

log = logging.getLogger("visiontune")
LIST_SUFFIXES = (".txt", ".lst", ".list")
TTA = ("none", "flip")
SPLIT_PREFIX = "split:"


def resolve_inputs(inputs: str) -> list[Path]:
    """The files `inputs` names, in a stable order; a UserError when it names nothing."""
    text = str(inputs)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        if not files:
            raise UserError(f"inputs={text} is an empty folder. Fix: inputs=<a folder with images>")
        return files
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return read_path_list(path)
        return [path]
    if any(c in text for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise UserError(f"inputs={text} matches no files. Fix: check the pattern (quote it in the shell)")
        return files
    raise UserError(
        f"inputs={text} does not exist. Fix: inputs=<image, folder, glob, list.txt> or inputs=split:test"
    )


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_path_list(path: Path) -> list[Path]:
    """One path a line; blank lines and `#` comments skipped; relative paths are to the list's folder."""
    paths = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(os.path.expanduser(line))
            paths.append(p if p.is_absolute() else path.parent / p)
    if not paths:
        raise UserError(f"{path} lists no paths. Fix: one image path a line")
    return paths


class FileInputs(Dataset):
    """(index, image tensor or None, error message) per file, so bad files become error rows."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        problem = check_image(path)
        if problem is None:
            try:
                return i, self.transform(open_image(path)), ""
            except Exception as exc:  # a decoder's own error, e.g. a truncated PNG
                problem = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
        if problem == "not an image file":
            problem = f"not an image file (extension {path.suffix or 'none'}; expected one of {sorted(IMAGE_EXTENSIONS)})"
        return i, None, problem


class SplitInputs(Indexed):
    """A split of the checkpoint's data: (index, image tensor or None, error, target)."""

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if item is None:
            return i, None, "unreadable image", -1
        return i, item[0], "", item[1] if isinstance(item[1], dict) else int(item[1])


def _collate(batch):
    return list(zip(*batch, strict=True))


@torch.inference_mode()
def predict_probs(model, images: torch.Tensor, temperature: float, tta: str = "none") -> torch.Tensor:
    """softmax(logits / T) for a batch (each head's own for a task); with tta=flip, the mean over the
    image and its mirror."""
    probs = output_probs(model, model(images), temperature)
    if tta == "flip":
        probs = (probs + output_probs(model, model(images.flip(-1)), temperature)) / 2
    return probs.float().cpu()


def output_probs(model, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if model.hparams.task:  # multilabel / multitask
        return heads.head_probabilities(logits, model.objective.heads, temperature)
    return scaled_probs(logits, temperature)


def prediction_columns(k: int, with_target: bool) -> list[str]:
    columns = ["path", "label", "prob"]
    for r in range(1, k + 1):
        columns += [f"top{r}_label", f"top{r}_prob"]
    if with_target:
        columns += ["target", "correct"]
    return [*columns, "error"]


def run_predictions(model, dataset, names: list[str], class_names, temperature, topk, tta, batch_size,
                    num_workers, device, spec: dict | None = None) -> list[dict]:  # fmt: skip
    """One row per item of `dataset` (FileInputs or SplitInputs), in order; `spec` (outputs.task_spec)
    for a multilabel or multitask model."""
    k = min(topk, len(class_names))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    rows: list[dict] = []
    for batch in loader:
        index, images, errors = batch[0], batch[1], batch[2]
        targets = batch[3] if len(batch) > 3 else None
        good = [j for j, image in enumerate(images) if image is not None]
        probs = None
        if good:
            probs = predict_probs(model, torch.stack([images[j] for j in good]).to(device), temperature, tta)
        position = {j: n for n, j in enumerate(good)}
        for j, i in enumerate(index):
            row = {"path": names[i], "error": errors[j]}
            if spec is not None:
                if j in position:
                    row.update(outputs.prediction_cells(probs[position[j]], spec))
                if targets is not None and isinstance(targets[j], dict):
                    row.update(outputs.target_cells(targets[j], spec, row if j in position else None))
                rows.append(row)
                continue
            if j in position:
                p = probs[position[j]]
                top_p, top_i = p.topk(k)
                row.update(label=class_names[int(top_i[0])], prob=f"{float(top_p[0]):.6f}")
                for r in range(k):
                    row[f"top{r + 1}_label"] = class_names[int(top_i[r])]
                    row[f"top{r + 1}_prob"] = f"{float(top_p[r]):.6f}"
            if targets is not None and targets[j] >= 0:
                row["target"] = class_names[targets[j]]
                if j in position:
                    row["correct"] = int(row["label"] == row["target"])
            rows.append(row)
    return rows


def write_rows(rows: list[dict], columns: list[str], path: Path) -> None:
    """Write the CSV under a temporary name, then rename it: never a half-written predictions.csv."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def predict(cfg: DictConfig, patch: dict | None = None) -> dict:
    """Predict `cfg.inputs`; writes <run dir>/predictions.csv and returns a summary (with `acc` for a split)."""
    quiet_warnings()
    if cfg.tta not in TTA:
        raise UserError(f"tta={cfg.tta} is unknown; choose one of {', '.join(TTA)}")
    if int(cfg.topk) < 1:
        raise UserError(f"topk={cfg.topk} must be at least 1")
    inputs = str(cfg.inputs)
    split = inputs[len(SPLIT_PREFIX) :] if inputs.startswith(SPLIT_PREFIX) else None
    if split is not None and split not in ("test", "val"):
        raise UserError(f"inputs={inputs}: the splits are split:test and split:val")
    files = resolve_inputs(inputs) if split is None else None  # bad paths fail before the model loads
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    model = load_classifier(cfg.ckpt_path).to(device)
    temperature = temperature_of(model)
    patch = cli_data_patch(cfg) if patch is None else patch
    datamodule = checkpoint_datamodule(model, patch)
    class_names = list(model.hparams.get("class_names") or datamodule.classes)
    batch_size = int(cfg.batch_size or datamodule.cfg.get("batch_size") or 32)
    if split is None:
        dataset = FileInputs(files, datamodule.eval_transform())
        names = [str(p) for p in files]
    else:  # labelled data: its classes must be the checkpoint's, as for eval
        allow = bool(patch.get("allow_class_mismatch", False))
        check_class_names(model.hparams.get("class_names"), list(datamodule.classes), allow)
        datamodule.setup("test" if split == "test" else "fit")
        source = datamodule.test_set if split == "test" else datamodule.val_set
        dataset = SplitInputs(source)
        names = [item_name(source, i, split) for i in range(len(source))]
    spec = (
        outputs.task_spec(model.hparams.task, model.head.thresholds) if model.hparams.task else None
    )
    rows = run_predictions(model, dataset, names, class_names, temperature, int(cfg.topk), cfg.tta,
                           batch_size, int(cfg.num_workers), device, spec)  # fmt: skip
    k = min(int(cfg.topk), len(class_names))
    columns = prediction_columns(k, split is not None)
    if spec is not None:
        columns = ["path", *outputs.head_columns(spec, split is not None), "error"]
    write_rows(rows, columns, run_dir / "predictions.csv")
    errors = sum(1 for r in rows if r["error"])
    summary = {"images": len(rows) - errors, "errors": errors, "temperature": temperature}
    for column in [c for c in columns if c.endswith("correct")]:  # correct, or <head>/correct
        judged = [r[column] for r in rows if column in r]
        head = column[: -len("correct")]
        if judged:  # a multilabel head is correct on the exact set of labels
            name = "exact_match" if f"{head}labels" in columns else "acc"
            summary[f"{split}/{head}{name}"] = sum(judged) / len(judged)
    for row in rows:
        if row["error"]:
            log.warning("skipped %s: %s", row["path"], row["error"])
    print_summary(summary, run_dir, keys=tuple(summary))
    print(f"predictions: {run_dir / 'predictions.csv'}")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    run_cli(predict, cfg)


if __name__ == "__main__":
    main()
