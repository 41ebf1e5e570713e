"""Image files on disk: scanning folders, CSV lists and Hugging Face metadata files, checking each file,
decoding it to RGB.

Bad files (wrong extension, empty, missing, a folder, a symlink loop, undecodable, truncated JPEG,
more pixels than `data.max_pixels`) are found at setup and listed by path, then skipped with a
warning, or refused with `data.strict=true`.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visiontune.data.images import DEFAULT_MAX_PIXELS, ImageTooLarge, open_checked, to_rgb
from visiontune.errors import UserError, one_line

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "val", "test")
# data=imagefolder: the folder names of each split (Hugging Face's imagefolder names val `validation`)
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
MAX_LISTED = 50  # bad files named one by one in a report; the rest are counted


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any mode (L, RGBA, P, I;16, CMYK) to RGB, with EXIF orientation applied; more than `max_pixels`
    pixels (None = no limit) is refused (ImageTooLarge) before decoding.

    The conversion is `visiontune.data.images.to_rgb`, the one a deployment (preprocess.json) runs too.
    """
    with open_checked(path, max_pixels) as img:
        return to_rgb(img)


class FileImageDataset(Dataset):
    """Image files with labels. A file that fails to decode mid-run (or has grown past `max_pixels`
    since the scan) is skipped with a warning."""

    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __init__(self, paths: list[str], labels: list[int], transform=None):
        self.paths, self.labels, self.transform = paths, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.paths[i], self.max_pixels)
        except Exception as exc:
            warnings.warn(f"skipping unreadable image {self.paths[i]}: {exc}", stacklevel=1)
            return None
        return (self.transform(image) if self.transform else image), self.target(i)

    def target(self, i: int):
        return int(self.labels[i])


class Collated(tuple):
    """A batch that its dataset assembled in one go (`__getitems__`): collate_skip_none passes it on."""


def collate_skip_none(batch):
    """default_collate over the readable samples; None (a skipped batch, with a warning) when there are none.

    The training and evaluation steps skip a None batch. A `Collated` batch is already assembled.
    """
    if isinstance(batch, Collated):
        return list(batch)
    if batch is None:
        return None
    samples = [b for b in batch if b is not None]
    if not samples:
        warnings.warn(f"skipping a batch: all {len(batch)} of its images were unreadable", stacklevel=2)
        return None
    return torch.utils.data.default_collate(samples)


def not_a_file(path: Path) -> str | None:
    """Why `path` is no regular file (missing, a folder, a symlink loop, a broken symlink), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "unreadable: a symlink loop (the link leads back to itself)"
        if os.path.islink(path):
            return f"unreadable: a broken symlink (its target {os.readlink(path)} does not exist)"
        return "missing" if exc.errno == errno.ENOENT else f"unreadable ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a folder, not an image file"
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Why `path` is not a usable image, or None. Header check (with the pixel limit, None = none) plus
    a JPEG end-marker check."""
    problem = not_a_file(path)
    if problem:
        return problem
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "not an image file"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with open_checked(path, max_pixels) as img:
            img.verify()
    except ImageTooLarge as exc:
        return f"too large: {exc}; not decoded"
    except Exception as exc:
        return f"unreadable ({type(exc).__name__})"
    if path.suffix.lower() in (".jpg", ".jpeg"):
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            if f.read(2) != b"\xff\xd9":
                return "truncated JPEG"
    return None


def drop_bad_files(
    paths: list[str],
    labels: list[int],
    where: Path,
    strict: bool,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[list[str], list[int]]:
    """The usable (paths, labels). Bad files are listed by path, then skipped (warning) or fatal (strict)."""
    good_paths, good_labels, bad = [], [], []
    for path, label in zip(paths, labels, strict=True):
        problem = check_image(Path(path), max_pixels)
        if problem:
            bad.append(f"{path} ({problem})")
        else:
            good_paths.append(path)
            good_labels.append(label)
    if bad:
        listing = "\n  ".join(bad[:MAX_LISTED])
        if len(bad) > MAX_LISTED:
            listing += f"\n  ... and {len(bad) - MAX_LISTED} more"
        if strict:
            raise UserError(
                f"{len(bad)} bad files under {where} (data.strict=true): fix or remove them, "
                "or set data.strict=false to skip them",
                details="  " + listing,
            )
        warnings.warn(f"skipping {len(bad)} bad files under {where}:\n  {listing}", stacklevel=3)
    return good_paths, good_labels


def _unknown_classes(where: Path, names, classes: list[str], train: str) -> None:
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise UserError(
            f"{where} has classes that are not in {train}: {unknown}. Fix the names, or add them to {train}"
        )


def _empty_classes(where: Path, labels: list[int], classes: list[str], what: str) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        raise UserError(f"{what} with no usable images under {where}: {empty}. Add images or remove them")


def scan_folder(
    root: Path, strict: bool, classes: list[str] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[list[str], list[str], list[int]]:
    """(classes, paths, labels) of `root/<class>/*`; bad files are reported, then skipped or fatal."""
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist. Fix: data.root=/path/with/<class>/ folders")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"{root} has no class folders. Expected {root}/<class_name>/<image files>")
    if classes is None:
        classes = found
    else:
        _unknown_classes(root, found, classes, "train/")
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if folder.is_dir():
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
            paths += [str(p) for p in files]
            labels += [label] * len(files)
    paths, labels = drop_bad_files(paths, labels, root, strict, max_pixels)
    if found == classes:
        _empty_classes(root, labels, classes, "class folders")
    return classes, paths, labels


def read_utf8(path: Path) -> str:
    """The text of `path` (a UTF-8 BOM is dropped); other encodings are a UserError naming the first bad byte."""
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        raise UserError(
            f"{path} is not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset} (line {line}) "
            "cannot be decoded. Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.csv > out.csv)"
        ) from None


def read_csv_list(csv_path: Path) -> tuple[list[str], list[str]]:
    """(paths, label names) of a `path,label` CSV. Paths are relative to the CSV's folder.

    The first line is a header when its path cell has no file extension (`path,label`). A header that
    names `file_name` and `label` (Hugging Face's metadata.csv) is read by column name (`read_metadata`).
    """
    if not csv_path.is_file():
        raise UserError(f"{csv_path} does not exist. Fix: data.root=/path/to/train.csv")
    rows = []
    for line, row in enumerate(csv.reader(io.StringIO(read_utf8(csv_path), newline="")), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if not rows and {"file_name", "label"} <= set(cells):
            return read_metadata(csv_path)
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise UserError(f"{csv_path} line {line}: expected `path,label`, got {row!r}")
        rows.append(cells)
    if rows and not Path(rows[0][0]).suffix and not (csv_path.parent / rows[0][0]).is_file():
        rows = rows[1:]  # the header
    if not rows:
        raise UserError(f"{csv_path} lists no images. Expected lines of `path,label`")
    return [str(csv_path.parent / p) for p, _ in rows], [label for _, label in rows]


def scan_csv(
    csv_path: Path,
    strict: bool,
    classes: list[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[list[str], list[str], list[int]]:
    """(classes, paths, labels) of a `path,label` CSV; bad files are reported, then skipped or fatal."""
    paths, names = read_csv_list(csv_path)
    classes = sorted(set(names)) if classes is None else classes
    return _labelled(csv_path, paths, names, classes, strict, max_pixels, "the training CSV")


def _labelled(
    where: Path,
    paths: list[str],
    names: list[str],
    classes: list[str],
    strict: bool,
    max_pixels: int | None,
    train: str,
) -> tuple[list[str], list[str], list[int]]:
    """(classes, paths, labels) of images listed with their class names (`where`: the list); a name not in
    `classes` (those of `train`) is a UserError; bad files are reported, then skipped or fatal."""
    _unknown_classes(where, names, classes, train)
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = drop_bad_files(paths, [index[n] for n in names], where, strict, max_pixels)
    if set(names) == set(classes):
        _empty_classes(where, labels, classes, "classes")
    return classes, paths, labels


def csv_files(root: Path) -> dict[str, Path]:
    """The CSV of each split: `root` itself is the training list, or a folder with train/val/test.csv."""
    if root.is_file():
        return {"train": root}
    if not (root / "train.csv").is_file():
        raise UserError(
            f"{root} has no train.csv. Fix: data.root=/path/to/list.csv, or a folder with train.csv "
            "(and optional val.csv, test.csv)"
        )
    return {split: root / f"{split}.csv" for split in SPLITS if (root / f"{split}.csv").is_file()}


# -- data=imagefolder: split folders or one flat folder, of class folders or Hugging Face metadata files
def metadata_file(folder: Path) -> Path | None:
    """`folder`'s metadata.csv or metadata.jsonl (Hugging Face's imagefolder format), or None."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise UserError(f"{folder} has both metadata.csv and metadata.jsonl: keep one of them")
    return found[0] if found else None


def imagefolder_sources(root: Path) -> tuple[dict[str, Path], bool]:
    """({split: where its images come from}, flat) of a data=imagefolder root. A source is a folder of
    class folders, or the metadata file in it.

    With a train/ folder: train/, and val/ (or validation/) and test/ where they exist. Without one, the
    root is flat: {"train": root, or its metadata file}, which the datamodule splits into train, val and test.
    """
    sources = {}
    for split, names in SPLIT_FOLDERS.items():
        found = [root / name for name in names if (root / name).is_dir()]
        if len(found) > 1:
            raise UserError(f"{root} has both val/ and validation/, the same split: merge them into one")
        if found:
            sources[split] = metadata_file(found[0]) or found[0]
    top = metadata_file(root)
    if "train" in sources and top:
        raise UserError(
            f"{top} sits next to train/: give each split folder its own metadata file "
            "(train/metadata.csv, validation/metadata.csv, ...), with file_name relative to it"
        )
    if sources and "train" not in sources:
        found = ", ".join(f"{p.name if p.is_dir() else p.parent.name}/" for p in sources.values())
        raise UserError(
            f"{root} has {found} but no train/. Expected {root}/train/<class>/ (with optional val/ and test/), "
            f"or a flat {root}/<class>/ without them"
        )
    return (sources, False) if sources else ({"train": top or root}, True)


def source_classes(source: Path) -> list[str]:
    """The class names of a split's source: its metadata's labels, or its class folders, sorted."""
    if source.is_file():
        return sorted(set(read_metadata(source)[1]))
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(
            f"{source} has no class folders and no metadata.csv or metadata.jsonl. "
            f"Expected {source}/<class>/<images>, or a metadata file (file_name,label)"
        )
    return classes


def scan_source(
    source: Path, strict: bool, classes: list[str] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[list[str], list[str], list[int]]:
    """(classes, paths, labels) of a split's source (`imagefolder_sources`)."""
    if source.is_file():
        return scan_metadata(source, strict, classes, max_pixels)
    return scan_folder(source, strict, classes, max_pixels)


def _metadata_rows(path: Path) -> tuple[list[str] | None, list[tuple[int, dict]]]:
    """(a CSV's header, or None for JSON lines; [(line, {column: value})] of the non-blank rows) of a
    metadata.csv or metadata.jsonl."""
    text = read_utf8(path)
    rows = []
    if path.suffix == ".jsonl":
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise UserError(
                    f'{path} line {line}: expected one JSON object a line, like {{"file_name": "0001.png", '
                    f'"label": "cat"}}; got {one_line(raw, 80)!r}'
                )
            rows.append((line, row))
        return None, rows
    reader = csv.reader(io.StringIO(text, newline=""))
    header = None
    for row in reader:
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if header is None:
            header = cells
        elif len(cells) != len(header):
            raise UserError(
                f"{path} line {reader.line_num}: {len(cells)} cells, the header has {len(header)} ({header})"
            )
        else:
            rows.append((reader.line_num, dict(zip(header, cells, strict=True))))
    return header, rows


def read_metadata(path: Path) -> tuple[list[str], list[str]]:
    """(paths, label names) of a Hugging Face imagefolder metadata file: metadata.csv (with a header) or
    metadata.jsonl (one JSON object a line), columns `file_name` and `label`; others are ignored.

    `file_name` is relative to the file's folder and stays inside it. `label` is a class name or an
    integer (whose name is its digits: classes sort as strings everywhere, so 10 comes before 2).
    """
    header, rows = _metadata_rows(path)
    for column in ("file_name", "label"):
        if header is not None and column not in header:
            raise UserError(
                f"{path} has no `{column}` column; its header is {header}. "
                "Expected a header with file_name and label (e.g. file_name,label)"
            )
    if not rows:
        raise UserError(f"{path} lists no images. Expected rows with a file_name and a label")
    paths, names = [], []
    for line, row in rows:
        missing = [k for k in ("file_name", "label") if k not in row]
        if missing:
            raise UserError(
                f'{path} line {line}: no "{missing[0]}" key. Each line needs "file_name" and "label"'
            )
        file_name, label = row["file_name"], row["label"]
        if not isinstance(file_name, str) or not file_name.strip():
            raise UserError(f"{path} line {line}: file_name must be a path to an image, got {file_name!r}")
        relative = os.path.normpath(file_name.strip())
        if os.path.isabs(relative) or relative.split(os.sep)[0] == "..":
            raise UserError(
                f"{path} line {line}: file_name {file_name!r} points outside {path.parent}. Fix: move the image "
                "into that folder and give its path relative to it (e.g. images/0001.jpg)"
            )
        if isinstance(label, str) and label.strip():
            names.append(label.strip())
        elif isinstance(label, int) and not isinstance(label, bool):
            names.append(str(label))
        else:
            raise UserError(
                f"{path} line {line} ({file_name}): label must be a class name or an integer, got {label!r}"
            )
        paths.append(str(path.parent / relative))
    return paths, names


def scan_metadata(
    path: Path, strict: bool, classes: list[str] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[list[str], list[str], list[int]]:
    """(classes, paths, labels) of a metadata file; bad files are reported, then skipped or fatal."""
    paths, names = read_metadata(path)
    classes = sorted(set(names)) if classes is None else classes
    return _labelled(path, paths, names, classes, strict, max_pixels, "the training split")


# -- multilabel and multitask CSVs (task=multilabel|multitask)
class TaskImageDataset(FileImageDataset):
    """Image files with a dict of targets per image ({head: class index or 0/1 vector}, -1 = missing)."""

    def __init__(self, paths: list[str], targets: list[dict], transform=None):
        self.paths, self.targets, self.transform = paths, targets, transform

    def target(self, i: int) -> dict:
        return {k: torch.as_tensor(v) for k, v in self.targets[i].items()}


def _csv_rows(csv_path: Path) -> list[list[str]]:
    """The non-blank rows of a CSV, cells stripped."""
    if not csv_path.is_file():
        raise UserError(f"{csv_path} does not exist. Fix: data.root=/path/to/train.csv")
    rows = []
    for row in csv.reader(io.StringIO(read_utf8(csv_path), newline="")):
        cells = [c.strip() for c in row]
        if any(cells):
            rows.append(cells)
    return rows


def _is_header(csv_path: Path, row: list[str]) -> bool:
    return not Path(row[0]).suffix and not (csv_path.parent / row[0]).is_file()


def read_task_csv(csv_path: Path, heads: list[dict], sep: str, multitask: bool) -> tuple[list[str], dict]:
    """(paths, {head: one value per image}) of a multilabel or multitask CSV.

    A value is a class name ("" = missing) for a multiclass head, and a list of label names for a
    multilabel head (None = missing). multitask: the header names the columns, the first is the path,
    and an empty cell is a missing label. multilabel: `path,labels` with the labels separated by `sep`
    (an empty cell: none of the labels), or a header `path,<label>,<label>,...` with one 0/1 column per label.
    """
    rows = _csv_rows(csv_path)
    header = rows[0] if rows and _is_header(csv_path, rows[0]) else None
    body = rows[1:] if header else rows
    if not body:
        raise UserError(f"{csv_path} lists no images. Expected a header line and lines of `path,<labels>`")
    width = len(header or body[0])
    for line, row in enumerate(body, start=2 if header else 1):
        if len(row) != width or not row[0]:
            raise UserError(f"{csv_path} line {line}: expected {width} cells with a path first, got {row!r}")
    paths = [str(csv_path.parent / row[0]) for row in body]
    if not multitask:
        if width == 2:
            return paths, {
                heads[0]["name"]: [[x.strip() for x in row[1].split(sep) if x.strip()] for row in body]
            }
        if header is None:
            raise UserError(
                f"{csv_path} has {width} columns but no header: one 0/1 column per label needs a header "
                "`path,<label>,<label>,...`; or use two columns `path,labels` with the labels separated by |"
            )
        return paths, {heads[0]["name"]: [_one_hot_labels(csv_path, header, row, line)
                                          for line, row in enumerate(body, start=2)]}  # fmt: skip
    if header is None:
        raise UserError(f"{csv_path} has no header: task=multitask needs one naming the columns (path first)")
    values = {}
    for h in heads:
        column = h.get("column") or h["name"]
        if column not in header[1:]:
            raise UserError(
                f"{csv_path} has no column '{column}' for head {h['name']}; its columns are {header[1:]}. "
                "Fix: the head's column, or the CSV header"
            )
        cells = [row[header.index(column)] for row in body]
        if h.get("kind", "multiclass") == "multilabel":
            values[h["name"]] = [[x.strip() for x in c.split(sep) if x.strip()] if c else None for c in cells]
        else:
            values[h["name"]] = cells
    return paths, values


def _one_hot_labels(csv_path: Path, header: list[str], row: list[str], line: int) -> list[str]:
    bad = [c for c in row[1:] if c not in ("0", "1", "")]
    if bad:
        raise UserError(f"{csv_path} line {line}: label columns hold 0 or 1, got {bad[:3]}")
    return [name for name, cell in zip(header[1:], row[1:], strict=True) if cell == "1"]


def one_hot_columns(csv_path: Path) -> list[str] | None:
    """The label columns of a 0/1-column multilabel CSV (in header order), or None for `path,labels`."""
    rows = _csv_rows(csv_path)
    if rows and len(rows[0]) > 2 and _is_header(csv_path, rows[0]):
        return rows[0][1:]
    return None


def task_classes(csv_path: Path, heads: list[dict], sep: str, multitask: bool) -> list[dict]:
    """`heads` with their `classes`: the sorted names found in the training CSV (the header's order for
    0/1 columns). A head whose column holds no label at all is a UserError."""
    _, values = read_task_csv(csv_path, heads, sep, multitask)
    columns = None if multitask else one_hot_columns(csv_path)
    out = []
    for h in heads:
        cells = values[h["name"]]
        if h.get("kind", "multiclass") == "multilabel":
            found = sorted({label for labels in cells if labels for label in labels})
            classes = columns if columns is not None else found
        else:
            classes = found = sorted({c for c in cells if c})
        if not found:
            raise UserError(
                f"{csv_path}: head {h['name']} (column '{h.get('column') or h['name']}') has no labels at all. "
                "Fill in its column, or remove the head"
            )
        out.append({**h, "classes": list(classes)})
    return out


def encode_targets(csv_path: Path, values: dict, heads: list[dict], train: str) -> list[dict]:
    """Per image {head: class index (-1 missing) or 0/1 float vector (all -1 missing)}; a label that is
    not one of the head's classes (named in the training CSV) is a UserError."""
    n = len(next(iter(values.values())))
    targets = [{} for _ in range(n)]
    for h in heads:
        classes = list(h["classes"])
        index = {c: i for i, c in enumerate(classes)}
        cells = values[h["name"]]
        named = {c for c in cells if c} if h.get("kind", "multiclass") == "multiclass" else {
            label for labels in cells if labels for label in labels}  # fmt: skip
        unknown = sorted(named - set(classes))
        if unknown:
            raise UserError(
                f"{csv_path} names labels of head {h['name']} that are not in {train}: {unknown[:10]}. "
                f"Fix the names, or add them to {train}"
            )
        for target, cell in zip(targets, cells, strict=True):
            if h.get("kind", "multiclass") == "multiclass":
                target[h["name"]] = np.int64(index[cell] if cell else -1)
            elif cell is None:
                target[h["name"]] = np.full(len(classes), -1.0, dtype=np.float32)
            else:
                vector = np.zeros(len(classes), dtype=np.float32)
                vector[[index[c] for c in cell]] = 1.0
                target[h["name"]] = vector
    return targets


def scan_task_csv(csv_path: Path, strict: bool, heads: list[dict], sep: str, multitask: bool,
                  train: str = "the training CSV",
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[list[str], list[dict]]:  # fmt: skip
    """(paths, targets) of a multilabel or multitask CSV; bad files are reported, then skipped or fatal."""
    paths, values = read_task_csv(csv_path, heads, sep, multitask)
    targets = encode_targets(csv_path, values, heads, train)
    return drop_bad_files(paths, targets, csv_path, strict, max_pixels)
