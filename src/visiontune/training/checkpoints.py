"""Checkpoints: written atomically, read safely.

Writing: each checkpoint goes to `<name>.tmp`, then is renamed over the old one, so a crash while
saving never leaves a half-written `last.ckpt`; a full disk or a read-only run dir is one clear line,
with no `.tmp` left behind.
Reading: always `torch.load(weights_only=True)`, local or remote (http(s):// and any fsspec URL,
where Lightning's own default would be `weights_only=False`), so a checkpoint can never run code;
anything that is not one of ours is one clear line that names the file and what it is.
A folder written by `visiontune-export format=hf` (config.json and model.safetensors) reads as a
checkpoint too (`read_hub_folder`): weights and settings, no optimizer state, so it cannot resume a run.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from visiontune.data.temporaries import temp_path, write_json
from visiontune.errors import UserError, one_line
from visiontune.models.adapters import ADAPTER_FILE, adapter_keys
from visiontune.models.backbones import CHECKPOINT_READER
from visiontune.models.structure import apply_structure
from visiontune.training.module import ImageClassifier

REMOTE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {
    errno.EROFS: "the folder is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# what torch.save's C++ writer says when the disk fills up under it
WRITE_FAILED = ("file write failed", "basic_ios::clear", "iostream error", "unexpected pos")
# what torch's weights-only unpickler says when a file needs a global (a function or a class) to load
NEEDS_CODE = (
    r"GLOBAL ([\w.]+)",
    r"unrecognized function ([^\n]+?)(?: which belongs|\n|$)",
    r"(?:create new object|Can only build).*?but got ([^\n]+)",
)
DOWNLOAD_TIMEOUT_S = 60
# Checks of the settings a checkpoint stores (its hyper_parameters), run on every load before anything
# is built from them: `check(hyper_parameters, source)` raises a one-line UserError. The config schema
# (config.py, a layer above) adds the command line's rules here, so a stored value meets the same
# rules as a typed one.
SETTINGS_CHECKS: list[Callable[[dict, str], None]] = []
FIX_WRITE = "Free space, or set hydra.run.dir=<a folder on another disk>"


def is_remote(path) -> bool:
    return REMOTE.match(str(path)) is not None and not str(path).startswith("file://")


def write_problem(exc: BaseException) -> str | None:
    """Why a checkpoint could not be written, in words, when it is the disk or the folder; else None."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return f"disk full ({exc.strerror or os.strerror(exc.errno)})"
    if isinstance(exc, OSError) and exc.errno in READ_ONLY:
        return f"{READ_ONLY[exc.errno]} ({exc.strerror or os.strerror(exc.errno)})"
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in WRITE_FAILED):
        return f"disk full? the write failed ({one_line(exc, 100)})"
    return None


def free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there"
    except OSError:
        return "free space unknown"


def save_atomic(checkpoint: dict, path: str | Path) -> None:
    """torch.save to `<name>.tmp`, then rename over `path`. The old file stays whole when that fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # on a read-only folder there is nothing to remove
            tmp.unlink(missing_ok=True)
        problem = write_problem(exc)
        if problem is None:
            raise
        if "full" in problem:
            problem = f"{problem}, {free_space(path.parent)}. {FIX_WRITE}"
        else:
            problem += ". Make it writable, or set hydra.run.dir=<a writable folder>"
        raise UserError(f"cannot write checkpoint {path}: {problem}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint atomically (see `save_atomic`); read each one with `load_checkpoint`.

    Lightning resumes (`trainer.fit(ckpt_path=...)`) through `load_checkpoint` here, so a resumed
    checkpoint is loaded with `weights_only=True` too, also from a URL.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if is_remote(path):  # remote file systems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        folder = Path(str(path).removeprefix("file://"))
        if not is_remote(path) and folder.is_dir() and any((folder / name).exists() for name in HUB_FILES):
            raise UserError(
                f"{path} is an exported model folder (weights only, no optimizer state): a run cannot resume "
                "from it. Fix: ckpt_path=<run dir>/checkpoints/last.ckpt"
            )
        return load_checkpoint(path)


def read_remote(url: str) -> bytes:
    """The bytes at an http(s) URL (urllib) or any other fsspec URL (s3://, gs://, ...)."""
    if url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            what = "does not exist" if exc.code == 404 else "cannot be downloaded"
            raise UserError(f"checkpoint {url} {what} (HTTP {exc.code} {exc.reason})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"cannot download checkpoint {url}: {reason}") from None
    import fsspec

    try:
        fs, location = fsspec.core.url_to_fs(url)
        return fs.cat_file(location)
    except FileNotFoundError:
        raise UserError(f"checkpoint {url} does not exist") from None
    except (ImportError, ValueError) as exc:  # no backend for the scheme (e.g. s3fs not installed)
        raise UserError(f"cannot read checkpoint {url}: {one_line(exc, 160)}") from None
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {url}: {one_line(exc, 160)}") from None


def load_problem(exc: Exception, head: bytes, size: int) -> str:
    """What a file that torch.load refused is: empty, truncated, pickled code, or not a checkpoint."""
    if size == 0:
        return "is empty (0 bytes): an interrupted save? Use another checkpoint of the run"
    code = next((m for m in (re.search(p, str(exc)) for p in NEEDS_CODE) if m), None)
    if code:
        return (
            f"holds pickled code ({code.group(1).strip()}): refusing to unpickle code, checkpoints load with "
            "weights_only=True (tensors and plain values only). Use a checkpoint saved by visiontune"
        )
    if head.startswith(b"PK"):
        return f"is truncated or corrupt (an incomplete archive of {size:,} bytes). Use another checkpoint"
    reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
    reason = reason.group(1) if reason else f"{type(exc).__name__}: {one_line(exc, 80)}"
    return f"is not a PyTorch checkpoint ({size:,} bytes of other data; {reason})"


def structure_problem(checkpoint) -> str | None:
    """What a loaded object is when it is not a visiontune checkpoint; None when it is one."""
    if not isinstance(checkpoint, dict):
        return f"is not a checkpoint: it holds a {type(checkpoint).__name__}, not a dict"
    if "state_dict" not in checkpoint:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return (
                f"is a plain state dict ({len(checkpoint)} tensor{'s' * (len(checkpoint) != 1)}), not a visiontune checkpoint. "
                "Use <run dir>/checkpoints/best.ckpt (or last.ckpt) of a visiontune run"
            )
        keys = ", ".join(map(str, list(checkpoint)[:6]))
        return f"is not a visiontune checkpoint: no state_dict (keys: {keys or 'none'})"
    if "hyper_parameters" not in checkpoint:
        return "is a Lightning checkpoint without hyper_parameters: not one saved by visiontune"
    return None


def load_checkpoint(path: str | Path) -> dict:
    """A visiontune checkpoint (local path or URL) as a dict, on the CPU, loaded with weights_only=True.

    Missing, empty, truncated, foreign or code-carrying files are a one-line UserError naming the file.
    """
    if is_remote(path):
        source, data = str(path), read_remote(str(path))
        size, head, stream = len(data), data[:4], io.BytesIO(data)
    else:
        source = Path(str(path).removeprefix("file://"))
        if source.is_dir() and any((source / name).exists() for name in HUB_FILES):
            return read_hub_folder(source)
        if not source.is_file():
            what = "is a folder, not a file nor an export folder" if source.is_dir() else "does not exist"
            raise UserError(
                f"checkpoint {source} {what}. Fix: ckpt_path=<run dir>/checkpoints/best.ckpt (or the folder of "
                "visiontune-export format=hf)"
            )
        try:
            size = source.stat().st_size
            with open(source, "rb") as f:
                head = f.read(4)
        except OSError as exc:
            raise UserError(f"cannot read checkpoint {source}: {exc.strerror or exc}") from None
        stream = source
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol note: the error below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever torch.load trips over, the file is not a loadable checkpoint
        raise UserError(f"checkpoint {source} {load_problem(exc, head, size)}") from None
    problem = structure_problem(checkpoint)
    if problem:
        raise UserError(f"checkpoint {source} {problem}")
    for check in SETTINGS_CHECKS:
        check(checkpoint["hyper_parameters"], str(source))
    return checkpoint


# `model.backbone=ckpt:<path>` (models/backbones.py, a layer below) reads its checkpoint here
CHECKPOINT_READER[:] = [load_checkpoint]


def load_classifier(ckpt_path: str | Path) -> ImageClassifier:
    """Rebuild a trained model from its checkpoint alone (or from an export folder of format=hf, or from
    an adapter file and its pretrained backbone: `load_adapter`), in eval mode.

    The backbone is built with random init and then takes the checkpoint's weights, so nothing is
    downloaded and a `file:` backbone does not need its original weights file.
    """
    if str(ckpt_path).endswith(".safetensors"):
        return load_adapter(ckpt_path)
    checkpoint = load_checkpoint(ckpt_path)
    hparams = dict(checkpoint["hyper_parameters"])
    present = {  # what the model is built from
        "model": isinstance(hparams.get("model"), dict) and "backbone" in hparams["model"],
        "num_classes": "num_classes" in hparams,
    }
    missing = [name for name, there in present.items() if not there]
    if missing:
        raise UserError(
            f"checkpoint {ckpt_path} is not a visiontune checkpoint (no '{missing[0]}' settings); a Lightning "
            "checkpoint of another model? Use <run dir>/checkpoints/best.ckpt of a visiontune run"
        )
    hparams["model"] = {**hparams["model"], "pretrained": False}
    model = ImageClassifier(**hparams)
    if checkpoint.get("structure"):  # a pruned model (compress method=prune): its narrower layers
        apply_structure(model, checkpoint["structure"], checkpoint["state_dict"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise UserError(
            f"{ckpt_path}: the weights do not fit the model it describes ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval()


# ---------------------------------------------------------------- the Hugging Face folder (export format=hf)

HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"
HUB_FILES = (HUB_CONFIG, HUB_WEIGHTS)
HUB_FORMAT = 1
FIX_HUB = "Fix: export it again (visiontune-export ckpt_path=<run dir>/checkpoints/best.ckpt format=hf)"


def write_hub_files(checkpoint: dict, folder: Path, described: dict) -> None:
    """model.safetensors (the checkpoint's whole state dict: backbone and head) and config.json into
    `folder`: `described` (what a reader of the Hub sees: classes, preprocessing, task), then what rebuilds
    the model exactly, the checkpoint's `hyper_parameters` and (a pruned model) its `structure`."""
    from safetensors.torch import save_file

    # contiguous copies: safetensors refuses views and tensors that share memory
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in checkpoint["state_dict"].items()}
    weights = Path(folder) / HUB_WEIGHTS
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes it owner-only; the folder is meant to be shared
    config = {
        "library_name": "visiontune",
        "visiontune_format": HUB_FORMAT,
        **described,
        "structure": checkpoint.get("structure"),
        "epoch": checkpoint.get("epoch"),
        "hyper_parameters": checkpoint["hyper_parameters"],
    }
    (Path(folder) / HUB_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_hub_folder(folder: Path) -> dict:
    """An export folder of format=hf as a checkpoint dict (`state_dict`, `hyper_parameters`, `structure`,
    `epoch`); a missing or foreign file is one line that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    missing = [name for name in HUB_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"export folder {folder} has no {missing[0]}: it is incomplete. {FIX_HUB}")
    try:
        config = json.loads((folder / HUB_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{folder / HUB_CONFIG} is not readable JSON ({one_line(exc, 80)}). {FIX_HUB}"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("hyper_parameters"), dict):
        raise UserError(
            f"{folder / HUB_CONFIG} describes no visiontune model (no hyper_parameters): a Hub folder of another "
            "library? To fine-tune a timm model folder: model.backbone=timm:local-dir:<folder>"
        )
    if (
        not isinstance(config.get("visiontune_format", HUB_FORMAT), int)
        or config.get("visiontune_format", 1) > HUB_FORMAT
    ):
        raise UserError(f"{folder} was written by a newer visiontune (format {config['visiontune_format']})")
    try:
        tensors = load_file(str(folder / HUB_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(
            f"{folder / HUB_WEIGHTS} is not a readable safetensors file ({one_line(exc, 80)}). {FIX_HUB}"
        ) from None
    for check in SETTINGS_CHECKS:
        check(config["hyper_parameters"], str(folder))
    return {
        "state_dict": tensors,
        "hyper_parameters": config["hyper_parameters"],
        "structure": config.get("structure"),
        "epoch": config.get("epoch"),
    }


# ---------------------------------------------------------------- parameter-efficient runs


def save_adapter(model, checkpoint: dict, folder: Path) -> Path:
    """`adapter.safetensors` (the trained tensors of `checkpoint`'s state_dict) and `adapter.json` (the
    model's hyperparameters) in `folder`."""
    from safetensors.torch import save_file

    state = checkpoint["state_dict"]
    tensors = {k: state[k].detach().contiguous() for k in adapter_keys(model) if k in state}
    hparams = checkpoint["hyper_parameters"]
    path = Path(folder) / ADAPTER_FILE
    partial = temp_path(path)
    save_file(tensors, str(partial), metadata={"visiontune": json.dumps(hparams)})
    partial.replace(path)
    write_json(path.with_name("adapter.json"), hparams)
    return path


def load_adapter(path: str | Path):
    """An `ImageClassifier` from its pretrained backbone and an adapter file, in eval mode."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"adapter {path} does not exist. Fix: ckpt_path=<run dir>/{ADAPTER_FILE}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get("visiontune")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"adapter {path} is not a readable safetensors file ({exc})") from None
    if not meta:
        raise UserError(f"adapter {path} carries no visiontune settings: not written by a visiontune run")
    hparams = json.loads(meta)
    for check in SETTINGS_CHECKS:
        check(hparams, str(path))
    model = ImageClassifier(**{**hparams, "model": {**hparams["model"], "pretrained": True}})
    expected = set(adapter_keys(model))
    if set(tensors) != expected:
        other = sorted(set(tensors) ^ expected)[:3]
        raise UserError(
            f"adapter {path} does not fit {hparams['model']['backbone']} with its finetune settings "
            f"(tensors {other} differ)"
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise UserError(
            f"adapter {path}: its tensors do not fit the model ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval()
