"""`InferenceSession`: the one path from a trained model to probabilities.

Every command after training goes through it (eval, predict, export, serve, compress and eval's
robustness passes). A session is opened on

- a checkpoint (`from_checkpoint`): the model on its device, the checkpoint's data config with the
  command line's `data.<key>` patch over it (`datamodule`), the eval transform, and the class-name
  check against the data (`data.allow_class_mismatch=true` lets different names of the same count pass);
- an exported model (`from_export`): model.onnx (onnxruntime) or model.torchscript.pt, with the
  preprocess.json beside it: its preprocessing, class names, temperature and heads.

Either way it holds the temperature and the task's heads (one `class` head for multiclass), and turns
logits into probabilities with `models.heads.head_probabilities`: softmax(logits / T) per multiclass
head, a sigmoid per label of a multilabel head.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from visiontune.data.indexed import Indexed
from visiontune.data.workers import ignore_interrupts
from visiontune.deploy.inference import check_class_names
from visiontune.deploy.outputs import spec_heads, task_spec
from visiontune.deploy.preprocess import load_spec, make_spec, preprocess_image
from visiontune.errors import UserError
from visiontune.models.heads import Head, head_probabilities, resolve_task

log = logging.getLogger("visiontune")
DEVICES = ("auto", "cpu", "cuda", "gpu")
EXPORT_FORMATS = {".onnx": "onnx", ".pt": "torchscript"}


# -- where the model runs
def pick_device(device: str = "auto") -> torch.device:
    """cuda for `cuda`/`gpu`, or for `auto` when there is one; else the CPU."""
    device = str(device)
    if device not in DEVICES:
        raise UserError(f"device={device} is unknown; choose one of auto, cpu, cuda")
    if device in ("gpu", "cuda") or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"device={device} but there is no CUDA device. Fix: device=cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def device_setting(cfg) -> str:
    """The command's `device`. eval and compress once spelled it `trainer.accelerator`: that spelling
    still works, with a warning that names the new key."""
    old = cfg.get("trainer", {}).get("accelerator") if "trainer" in cfg else None
    if old is not None:
        message = f"trainer.accelerator={old} is the old spelling of device={old}: use device={old}"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        log.warning(message)
        return str(old)
    return str(cfg.get("device") or "auto")


def temperature_of(hparams) -> float:
    """A checkpoint's stored temperature (eval calibrate=true sets it); 1.0 when uncalibrated."""
    value = hparams.get("temperature", 1.0)
    value = 1.0 if value is None else float(value)
    if not value > 0:
        raise UserError(
            f"the checkpoint's temperature is {value}; it must be > 0. Re-run eval calibrate=true"
        )
    return value


def checkpoint_datamodule(model, patch: dict | None = None):
    """The data a checkpoint was trained on (with `patch` over its data config), without augmentation."""
    from visiontune.data.datamodule import ImageDataModule
    from visiontune.models.backbones import backbone_data_config

    data = {**model.hparams.data, **(patch or {})}
    return ImageDataModule(
        data, {"name": "none"}, backbone_data_config(model.hparams.model["backbone"]), seed=model.hparams.seed,
        task=model.hparams.get("task"),
    )  # fmt: skip


# -- exported files
def open_onnx(path: str | Path, threads: int | None = None):
    """An onnxruntime session on the CPU (`threads` intra-op threads and one inter-op, when given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None


class ExportedModel:
    """An exported file run on a numpy batch (N, 3, H, W) float32 -> numpy outputs: model.onnx in
    onnxruntime, model.torchscript.pt in torch.jit."""

    def __init__(self, path: str | Path, fmt: str | None = None, threads: int | None = None):
        path = Path(path)
        self.format = fmt or EXPORT_FORMATS.get(path.suffix)
        if self.format is None:
            raise UserError(f"{path} is neither .onnx nor .pt. Fix: model=<export run dir>/model.onnx")
        if self.format == "onnx":
            self.session = open_onnx(path, threads)
            self.input_name = self.session.get_inputs()[0].name
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.format == "onnx":
            return self.session.run(None, {self.input_name: batch})[0]
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch)).numpy()


def _collate_present(batch):
    present = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(present) if present else None


def indexed_loader(dataset, like: DataLoader | None = None, batch_size: int = 64) -> DataLoader:
    """In-order batches of (indices, images, targets), unreadable items left out (None for a batch of
    them only); worker count and
    batch size taken from `like` (the DataModule's own loader) when given."""
    return DataLoader(
        Indexed(dataset),
        batch_size=like.batch_size if like is not None else batch_size,
        num_workers=like.num_workers if like is not None else 0,
        shuffle=False,
        collate_fn=_collate_present,
        worker_init_fn=ignore_interrupts,
    )


class InferenceSession:
    """A trained model (a checkpoint, or an exported file with its preprocess.json), ready to turn
    images into each head's probabilities. Open one with `from_checkpoint` or `from_export`.

    - `heads`, `task` (the task as plain JSON: each head's kind, classes, slice and thresholds),
      `class_names`, `temperature`, `source`;
    - `probabilities(logits)`: the one formula (`head_probabilities`) at the session's temperature;
    - `__call__(images)`: RGB PIL images -> probabilities (numpy), what serve answers with;
    - checkpoints only: `model`, `device`, `datamodule` (the checkpoint's data with the command line's
      patch), `labelled_data()` (the same, its class names checked), `logits`, `predict_batch`,
      `collect`, `export_spec`, and `adapter` (None, or the test-time adaptation that `logits` goes
      through).
    """

    def __init__(self, source: str, task: dict, temperature: float, class_names: list[str]):
        self.source, self.task, self.temperature = source, task, float(temperature)
        self.class_names = list(class_names)
        self.heads: list[Head] = spec_heads(task)
        self.model = self.exported = self.spec = None
        self.device = torch.device("cpu")
        self.patch: dict = {}
        self.adapter = None  # images -> logits, a copy of the model adapting at test time (adapt=bn|tent)
        self._datamodule = self._transform = None

    @classmethod
    def from_checkpoint(cls, ckpt_path, device: str = "auto", patch: dict | None = None) -> InferenceSession:
        """A checkpoint's model on `device`; `patch` (the command line's `data.<key>` values) goes over
        its stored data config."""
        from visiontune.training.checkpoints import load_classifier

        target = pick_device(device)
        model = load_classifier(ckpt_path).to(target)
        names = model.hparams.get("class_names") or list(model.heads[0].classes)
        session = cls(str(ckpt_path), task_spec(model.task, model.head.thresholds.cpu()),
                      temperature_of(model.hparams), names)  # fmt: skip
        session.model, session.device, session.patch = model, target, dict(patch or {})
        session.heads = list(model.heads)  # with their loss weights, which the plain spec does not carry
        return session

    @classmethod
    def from_adapters(cls, adapters, device: str = "auto") -> dict[str, InferenceSession]:
        """Task name -> the session of its adapter file (adapter.safetensors of a finetune=lora|bitfit|norm
        run), all on one backbone, whose tensors the models share (`models.adapters.share_base`)."""
        from visiontune.models.adapters import share_base

        if not isinstance(adapters, Mapping) or not adapters:
            raise UserError(
                f"adapters={adapters}: give task names and adapter files, adapters='{{a: A, b: B}}'"
            )
        sessions = {}
        for name, path in adapters.items():
            if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or not isinstance(path, str):
                raise UserError(
                    f"adapters: {name!r}: {path!r} must be a task name (letters, digits, _ . -) and an adapter file"
                )
            if not path.endswith(".safetensors"):
                raise UserError(
                    f"adapters: {name}={path} is not an adapter file. Fix: <run dir>/adapter.safetensors"
                )
            sessions[name] = cls.from_checkpoint(path, device)
        backbones = {name: s.model.hparams.model["backbone"] for name, s in sessions.items()}
        first = next(iter(backbones))
        if len(set(backbones.values())) > 1:
            other = next(n for n in backbones if backbones[n] != backbones[first])
            raise UserError(
                f"adapters: {other} is for {backbones[other]}, {first} for {backbones[first]}: one service "
                "shares one backbone. Fix: serve each backbone's adapters separately"
            )
        shared = share_base([s.model for s in sessions.values()])
        log.info("%d adapters on one %s (%d tensors shared)", len(sessions), backbones[first], shared)
        return sessions

    @classmethod
    def from_export(cls, path) -> InferenceSession:
        """model.onnx or model.torchscript.pt, with the preprocess.json that `visiontune.export` wrote beside it."""
        path = Path(path)
        spec_path = path.with_name("preprocess.json")
        if not path.is_file():
            raise UserError(f"model={path} does not exist. Fix: model=<export run dir>/model.onnx")
        if not spec_path.is_file():
            raise UserError(f"no preprocess.json beside {path}. Fix: export again (visiontune-export)")
        spec = load_spec(spec_path)
        # a multiclass export written before preprocess.json described its task: one head over the classes
        task = spec.get("task") or task_spec(resolve_task(None, spec["class_names"]), [])
        session = cls(str(path), task, spec.get("temperature", 1.0), spec["class_names"])
        session.exported, session.spec = ExportedModel(path), spec
        return session

    # -- probabilities
    def probabilities(self, logits) -> torch.Tensor:
        """Each head's probabilities (float32) from logits (a tensor or a numpy array), at the session's temperature."""
        return head_probabilities(torch.as_tensor(logits), self.heads, self.temperature)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The checkpoint's logits (float32, on the CPU) of a preprocessed batch; through the session's
        `adapter` when it has one (eval and predict `adapt=bn|tent`: a copy of the model that adapts to
        each batch, evaluation/adapt.py)."""
        if self.adapter is not None:
            return self.adapter(images.to(self.device)).float().cpu()
        with torch.inference_mode():
            return self.model(images.to(self.device)).float().cpu()

    def predict_batch(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Probabilities of a preprocessed batch; with tta=flip, the mean over each image and its mirror."""
        probs = self.probabilities(self.logits(images))
        if tta == "flip":
            probs = (probs + self.probabilities(self.logits(images.flip(-1)))) / 2
        return probs

    def __call__(self, images: list) -> np.ndarray:
        """RGB PIL images -> probabilities (N, outputs): the checkpoint through its eval transform, or the
        exported file through preprocess.json."""
        if self.model is not None:
            return self.predict_batch(torch.stack([self.transform(image) for image in images])).numpy()
        out = self.exported(np.stack([preprocess_image(image, self.spec) for image in images]))
        return out if self.spec["output"] == "probabilities" else self.probabilities(out).numpy()

    # -- the checkpoint's data
    @property
    def datamodule(self):
        if self.model is None:
            raise TypeError("an exported model has no data config; open the checkpoint instead")
        if self._datamodule is None:
            self._datamodule = checkpoint_datamodule(self.model, self.patch)
        return self._datamodule

    @property
    def transform(self):
        """The checkpoint's eval transform (PIL image or uint8 tensor -> normalised float tensor)."""
        if self._transform is None:
            self._transform = self.datamodule.eval_transform()
        return self._transform

    def labelled_data(self):
        """The DataModule, once its classes are checked against the checkpoint's: by name and order;
        different names of the same count pass (with a warning) only with data.allow_class_mismatch=true."""
        datamodule = self.datamodule
        allow = bool(self.patch.get("allow_class_mismatch", False))
        check_class_names(self.model.hparams.get("class_names"), list(datamodule.classes), allow)
        return datamodule

    def collect(self, dataset, like: DataLoader | None = None, batch_size: int = 64):
        """(logits (N, outputs), targets {head name: (N, ...)}, dataset indices (N,)) over a split, in
        order, its unreadable items left out. A multiclass split's targets are its class indices. An
        adapter starts afresh: each split is a stream of its own."""
        order = None
        if self.adapter is not None:  # in the adapter's order (adapt.shuffle), then back in the split's
            self.adapter.reset()
            order = self.adapter.order(len(dataset))
            dataset = Subset(dataset, order.tolist())
        logits, targets, indices = [], [], []
        for batch in indexed_loader(dataset, like, batch_size):
            if batch is None:  # every item of the batch was unreadable
                continue
            index, x, y = batch
            logits.append(self.logits(x))
            targets.append(y if isinstance(y, dict) else {self.heads[0].name: y})
            indices.append(index if order is None else order[index])
        if not logits:
            raise UserError("no readable images in this split. Fix: check data.root and the files in it")
        indices = torch.cat(indices).long()
        back = indices.argsort()
        joined = {name: torch.cat([t[name] for t in targets])[back] for name in targets[0]}
        return torch.cat(logits)[back], joined, indices[back]

    def export_spec(self, output: str) -> dict:
        """preprocess.json's content: the data's preprocessing, classes, temperature, heads and `output`."""
        datamodule = self.datamodule
        spec = make_spec(datamodule.image_size, datamodule.crop_pct, datamodule.interpolation, datamodule.mean,
                         datamodule.std, self.class_names, self.temperature, output,
                         backbone=str(self.model.hparams.model.get("backbone", "")))  # fmt: skip
        spec["task"] = self.task
        return spec
