"""`python -m visiontune.predict ckpt_path=PATH inputs=WHAT [topk=5] [tta=flip]`: label images, write predictions.csv.

WHAT is an image file, a folder (searched recursively), a glob (`'shots/**/*.jpg'`), a text file of
paths (.txt/.lst, one a line, relative to the file's folder, `#` comments), or `split:test` /
`split:val`: that split of the checkpoint's own data, with `target` and `correct` columns (its
accuracy is eval's test/acc exactly: the same images through the same transform and model).

A file that is not a readable image (a folder named in a list, a symlink loop, more than `max_pixels`
pixels, refused from its header before decoding) becomes a row with the reason in `error`; the other
files are still predicted and the exit code is 0. A file name that is not UTF-8 is written to the CSV as
its own bytes (`surrogateescape`); predictions.csv appears whole or not at all. Probabilities are
softmax(logits / temperature) with the checkpoint's temperature (eval calibrate=true stores one).

`adapt=bn|tent` predicts through a copy of the model that adapts to the batches (evaluation/adapt.py),
which it sees in a seeded random order unless adapt.shuffle=false; the rows keep the inputs' order and
the checkpoint is not changed.

Every task writes one column group per head (deploy/outputs.py): `label,prob,top1_label,top1_prob,...`
for a multiclass head, `labels,probs` (the labels at or above their thresholds, `|`-separated, most
probable first) for a multilabel one, named `<head>/label` etc. for multitask (plus `target,correct` for
a split; for a multilabel head `correct` means the exact set). A multiclass model is one such head.
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
from torch.utils.data import DataLoader, Dataset, Subset

from visiontune.cli import CONF_DIR, REQUIRED, data_patch, print_summary, run_cli
from visiontune.config import Adapt, check_schema
from visiontune.data.files import IMAGE_EXTENSIONS, check_image
from visiontune.data.images import DEFAULT_MAX_PIXELS, open_image
from visiontune.data.indexed import Indexed
from visiontune.data.workers import ignore_interrupts
from visiontune.deploy import outputs
from visiontune.deploy.inference import item_name, quiet_warnings
from visiontune.deploy.session import InferenceSession, device_setting
from visiontune.errors import UserError
from visiontune.evaluation.adapt import AdaptSettings, make_adapter

log = logging.getLogger("visiontune")
LIST_SUFFIXES = (".txt", ".lst", ".list")
TTA = ("none", "flip")
SPLIT_PREFIX = "split:"


def resolve_inputs(inputs: str) -> list[Path]:
    """The files `inputs` names, in a stable order; a UserError when it names nothing."""
    text = str(inputs)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _listed(p) and not _hidden(p.relative_to(path)))
        if not files:
            raise UserError(f"inputs={text} is an empty folder. Fix: inputs=<a folder with images>")
        return files
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            return read_path_list(path)
        return [path]
    if any(c in text for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
        files = [p for p in matches if _listed(p)]
        if not files:
            raise UserError(f"inputs={text} matches no files. Fix: check the pattern (quote it in the shell)")
        return files
    raise UserError(
        f"inputs={text} does not exist. Fix: inputs=<image, folder, glob, list.txt> or inputs=split:test"
    )


def _listed(path: Path) -> bool:
    """A file, or a link that leads to no folder (a loop, a broken link): it gets a row with its problem."""
    return path.is_file() or (path.is_symlink() and not path.is_dir())


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

    def __init__(self, paths: list[Path], transform, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.paths, self.transform, self.max_pixels = paths, transform, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        problem = check_image(path, self.max_pixels)
        if problem is None:
            try:
                return i, self.transform(open_image(path, self.max_pixels)), ""
            except Exception as exc:  # a decoder's own error, e.g. a truncated PNG
                problem = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})"
        if problem == "not an image file":
            problem = f"not an image file (extension {path.suffix or 'none'}; expected one of {sorted(IMAGE_EXTENSIONS)})"
        elif problem.startswith("too large"):
            problem += " (raise max_pixels= to predict it)"
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


def run_predictions(session: InferenceSession, dataset, names: list[str], topk: int, tta: str, batch_size: int,
                    num_workers: int) -> list[dict]:  # fmt: skip
    """One row per item of `dataset` (FileInputs or SplitInputs), in order: each head's cells. A
    test-time adapter sees the items in its own order (adapt.shuffle); the rows keep theirs."""
    if session.adapter is not None:
        session.adapter.reset()
        dataset = Subset(dataset, session.adapter.order(len(dataset)).tolist())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        worker_init_fn=ignore_interrupts)  # fmt: skip
    rows: list[tuple[int, dict]] = []
    for batch in loader:
        index, images, errors = batch[0], batch[1], batch[2]
        targets = batch[3] if len(batch) > 3 else None
        good = [j for j, image in enumerate(images) if image is not None]
        probs = session.predict_batch(torch.stack([images[j] for j in good]), tta) if good else None
        position = {j: n for n, j in enumerate(good)}
        for j, i in enumerate(index):
            row = {"path": names[i], "error": errors[j]}
            if j in position:
                row.update(outputs.prediction_cells(probs[position[j]], session.task, topk=topk))
            if targets is not None:  # a multiclass split's target is a class index
                target = targets[j] if isinstance(targets[j], dict) else {session.heads[0].name: targets[j]}
                row.update(outputs.target_cells(target, session.task, row if j in position else None))
            rows.append((i, row))
    return [row for _, row in sorted(rows, key=lambda pair: pair[0])]


def write_rows(rows: list[dict], columns: list[str], path: Path) -> None:
    """Write the CSV under a temporary name, then rename it: never a half-written predictions.csv, and no
    temporary file left when writing fails. UTF-8, with a file name that is not UTF-8 written as its own
    bytes (`surrogateescape`, as Python read it), so the path column opens the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shown(name: str) -> str:
    """A path for a message: bytes that are not UTF-8 as \\x escapes (a log file cannot take surrogates)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


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
    max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    if max_pixels is not None and (type(max_pixels) is not int or max_pixels < 1):
        raise UserError(f"max_pixels={max_pixels} must be a whole number of pixels, at least 1 (null = none)")
    adapters = cfg.get("adapters")
    if bool(cfg.get("ckpt_path")) == bool(adapters):
        raise UserError(
            f"predict needs ckpt_path={REQUIRED['ckpt_path']} (or adapters='{{task: adapter.safetensors, ...}}', "
            "not both)"
        )
    if "adapt" in cfg:
        check_schema(cfg, Adapt, "adapt")
    files = resolve_inputs(inputs) if split is None else None  # bad paths fail before the model loads
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    patch = data_patch(cfg) if patch is None else patch
    if adapters:  # one backbone, several adapters: one CSV each
        sessions = InferenceSession.from_adapters(adapters, device_setting(cfg))
        return {name: predict_with(s, cfg, split, files, run_dir / f"predictions_{name}.csv")
                for name, s in sessions.items()}  # fmt: skip
    session = InferenceSession.from_checkpoint(cfg.ckpt_path, device_setting(cfg), patch)
    return predict_with(session, cfg, split, files, run_dir / "predictions.csv")


def predict_with(session: InferenceSession, cfg: DictConfig, split: str | None, files, out: Path) -> dict:
    """Predict the files (or the split) with one model; write `out` and return the summary."""
    max_pixels = cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    run_dir = out.parent
    if split is None:
        dataset = FileInputs(files, session.transform, max_pixels)
        names = [str(p) for p in files]
    else:  # labelled data: its classes must be the checkpoint's, as for eval
        datamodule = session.labelled_data()
        datamodule.setup("test" if split == "test" else "fit")
        source = datamodule.test_set if split == "test" else datamodule.val_set
        dataset = SplitInputs(source)
        names = [item_name(source, i, split) for i in range(len(source))]
    batch_size = int(cfg.batch_size or session.datamodule.cfg.get("batch_size") or 32)
    settings = AdaptSettings.from_config(cfg.get("adapt"))
    if settings.method != "none" and cfg.tta != "none":
        raise UserError(f"tta={cfg.tta} with adapt={settings.method}: choose one of the two")
    session.adapter = make_adapter(session.model, settings, session.heads, batch_size)
    rows = run_predictions(session, dataset, names, int(cfg.topk), cfg.tta, batch_size, int(cfg.num_workers))
    columns = ["path", *outputs.head_columns(session.task, split is not None, int(cfg.topk)), "error"]
    write_rows(rows, columns, out)
    errors = sum(1 for r in rows if r["error"])
    summary = {"images": len(rows) - errors, "errors": errors, "temperature": session.temperature}
    for column in [c for c in columns if c.endswith("correct")]:  # correct, or <head>/correct
        judged = [r[column] for r in rows if column in r]
        head = column[: -len("correct")]
        if judged:  # a multilabel head is correct on the exact set of labels
            name = "exact_match" if f"{head}labels" in columns else "acc"
            summary[f"{split}/{head}{name}"] = sum(judged) / len(judged)
    for row in rows:
        if row["error"]:
            log.warning("skipped %s: %s", shown(row["path"]), row["error"])
    print_summary(summary, run_dir, keys=tuple(summary))
    print(f"predictions: {out}")
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    run_cli(predict, cfg)


if __name__ == "__main__":
    main()
