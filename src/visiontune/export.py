"""`python -m visiontune.export ckpt_path=PATH format=onnx|torchscript|hf`: a deployable model and its preprocess.json.

format=hf writes a Hugging Face folder instead (`<out_dir>/hf`: model.safetensors, config.json, README.md;
see `visiontune.deploy.hub`), checked by loading it back, and uploads it with `push=true repo_id=...`.

Into the run dir (or `out_dir`): model.onnx (torch.onnx.export with dynamo=True, one file, dynamic
batch axis) or model.torchscript.pt (traced), preprocess.json beside it, and export.json with the
parity check. The model returns softmax(logits / temperature) (`output=probabilities`, the default)
or the logits (`output=logits`); preprocess.json says which.

Parity check: real test images of the checkpoint's data are preprocessed by `preprocess_image` from
preprocess.json alone (numpy, as a deployer without torch would) and run through the exported file
(onnxruntime for ONNX). `max_abs_diff` is the largest difference of those probabilities from the
PyTorch checkpoint's own, on the same images through its training eval transform: the whole
deployed path against PyTorch. export.json also splits it: `model_max_abs_diff` (the exported file
vs PyTorch on identical inputs) and `preprocess_max_abs_diff` (deployer vs training preprocessing,
in grey levels). Both probability differences must be at most `tolerance` (1e-4), or nothing is written.

Every task exports the same way: the heads' outputs side by side (softmax per multiclass head, sigmoid
per label; a multiclass model is one head), and preprocess.json's `task` names each head's slice,
classes and (multilabel) thresholds.

Every file goes to a temporary name first (`.<name>.<pid>@<host>.tmp`) and is renamed only when the
check has passed; the temporaries of an export that was killed are removed by the next one
(`visiontune.data.temporaries`). An out_dir that is a file or cannot be written is one line, exit 2.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from visiontune.cli import CONF_DIR, data_patch, quiet_libraries, run_cli
from visiontune.data.temporaries import remove_stale, temp_path
from visiontune.deploy import hub
from visiontune.deploy.inference import quiet_warnings, raw_image
from visiontune.deploy.preprocess import INTERPOLATIONS, load_spec, preprocess_image
from visiontune.deploy.session import ExportedModel, InferenceSession
from visiontune.errors import UserError
from visiontune.models.adapters import lora_layers, merge_lora
from visiontune.models.heads import head_probabilities

log = logging.getLogger("visiontune")
FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "hf": hub.HUB_FOLDER}
OUTPUTS = ("probabilities", "logits")
INPUT_NAME, OUTPUT_NAMES = "image", {"probabilities": "probabilities", "logits": "logits"}


class Deployable(nn.Module):
    """The network alone (backbone, then head: no Lightning state, so it traces and exports) with the
    temperature folded in: image batch -> each head's probabilities, or logits with output="logits".

    LoRA adapters are merged into their layers' weights here, so the exported graph is the plain backbone.
    The parity check compares it against the session's own (unmerged) probabilities, so a wrong assembly
    or merge fails there.
    """

    def __init__(self, session: InferenceSession, output: str):
        super().__init__()
        model = session.model
        if lora_layers(model):  # finetune=lora: the updates folded into the weights, on a copy of the model
            model = copy.deepcopy(model)
            log.info("merged %d LoRA layers into their weights", merge_lora(model))
        self.net = nn.Sequential(model.backbone, model.head)
        self.heads, self.temperature, self.output = session.heads, session.temperature, output

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.net(image)
        if self.output == "logits":
            return logits
        return head_probabilities(logits, self.heads, self.temperature)


def export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, output_name: str, opset: int | None
) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = {"opset_version": opset} if opset else {}
    # the exporter's graph passes log a line each, and one per initializer they merge: to the log file
    with quiet_libraries(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_shapes={INPUT_NAME: {0: batch}},
            external_data=False,  # one self-contained file (fine below 2 GB), safe to rename
            verbose=False,
            **kwargs,
        )


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    # torch 2.14 marks TorchScript deprecated (a warning, silenced); format=onnx is the future-proof one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(str(path))


def parity_indices(n_total: int, n: int) -> list[int]:
    """`n` indices spread evenly over a split (every class shows up in a sorted image folder)."""
    if n_total <= n:
        return list(range(n_total))
    return np.linspace(0, n_total - 1, n).round().astype(int).tolist()


def parity_check(exported_model: ExportedModel, session: InferenceSession, spec: dict, images) -> dict:
    """The deployed path (preprocess.json + exported file) against PyTorch (eval transform + classifier)."""
    deployed = np.stack([preprocess_image(image, spec) for image in images])
    trained = torch.stack([session.transform(image) for image in images])
    exported = exported_model(deployed)
    if spec["output"] == "logits":
        exported = session.probabilities(exported).numpy()
    same_inputs = session.predict_batch(torch.from_numpy(deployed)).numpy()
    reference = session.predict_batch(trained).numpy()
    std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return {
        "max_abs_diff": float(np.abs(exported - reference).max()),
        "model_max_abs_diff": float(np.abs(exported - same_inputs).max()),
        "preprocess_max_abs_diff": float((np.abs(deployed - trained.numpy()) * std * 255).max()),
        "top1_agreement": float((exported.argmax(1) == reference.argmax(1)).mean()),
        "parity_images": len(images),
    }


def _replace_all(pairs: list[tuple[Path, Path]]) -> None:
    for tmp, final in pairs:
        os.replace(tmp, final)


def writable_out_dir(out_dir: Path, key: str, probe: Path) -> None:
    """Create `out_dir` and write `probe` there once; a file in its place or a folder that cannot be
    written is one line that names it (`key`: the setting that chose it)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(
            f"{key}={out_dir} is a file, not a folder. Fix: set {key}=<a folder>, or move that file"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise UserError(
            f"cannot write into {key}={out_dir} ({exc.strerror or exc}). Fix: make it writable, or set "
            f"{key}=<a writable folder>"
        ) from None


def export(cfg: DictConfig, patch: dict | None = None) -> dict:
    """Export `cfg.ckpt_path`; returns export.json's content."""
    quiet_warnings()
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise UserError(f"format={fmt} is unknown; choose one of {', '.join(FORMATS)}")
    if cfg.output not in OUTPUTS:
        raise UserError(f"output={cfg.output} is unknown; choose one of {', '.join(OUTPUTS)}")
    parity_images = cfg.parity_images
    if not (isinstance(parity_images, int) and not isinstance(parity_images, bool) and parity_images >= 1):
        raise UserError(
            f"parity_images={parity_images}: must be an integer >= 1, the test images the exported model is "
            "checked on (the parity check always runs; 64 is the default)"
        )
    hub.check_push(cfg)  # a bad repo_id fails before any export work
    patch = data_patch(cfg) if patch is None else patch
    session = InferenceSession.from_checkpoint(cfg.ckpt_path, "cpu", patch)
    datamodule = session.labelled_data()
    if fmt != "hf" and datamodule.interpolation not in INTERPOLATIONS:
        raise UserError(
            f"interpolation {datamodule.interpolation}: preprocess.json readers reproduce only "
            f"{', '.join(INTERPOLATIONS)}. Fix: train with data.interpolation=bicubic (or bilinear)"
        )
    spec = session.export_spec(str(cfg.output))
    datamodule.setup("test")
    indices = parity_indices(len(datamodule.test_set), int(cfg.parity_images))
    images = [raw_image(datamodule.test_set, i) for i in indices]
    if not images:
        raise UserError("the test split has no images for the parity check. Fix: check data.root")

    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.paths.output_dir)
    final = {
        "model": out_dir / FORMATS[fmt],
        "preprocess": out_dir / "preprocess.json",
        "report": out_dir / "export.json",
    }
    tmp = {k: temp_path(p) for k, p in final.items()}
    writable_out_dir(out_dir, "out_dir" if cfg.out_dir else "hydra.run.dir", tmp["report"])
    if fmt == "hf":
        return hub.export_folder(cfg, session, images, out_dir)
    remove_stale(
        out_dir, [f".{name}.*tmp" for name in (*FORMATS.values(), "preprocess.json", "export.json")], "export"
    )
    module = Deployable(session, cfg.output).eval()
    size = datamodule.image_size
    example = torch.zeros(2, 3, size, size)
    try:
        if fmt == "onnx":
            export_onnx(module, example, tmp["model"], OUTPUT_NAMES[cfg.output], cfg.opset)
        else:
            export_torchscript(module, example, tmp["model"])
        tmp["preprocess"].write_text(json.dumps(spec, indent=2))
        parity = parity_check(ExportedModel(tmp["model"], fmt), session, load_spec(tmp["preprocess"]), images)
        result = {
            "format": fmt,
            "model": str(final["model"]),
            "preprocess": str(final["preprocess"]),
            "ckpt_path": str(cfg.ckpt_path),
            "output": cfg.output,
            "temperature": session.temperature,
            "dynamic_batch": True,
            "tolerance": float(cfg.tolerance),
            **parity,
        }
        print(f"parity on {parity['parity_images']} test images: max_abs_diff {parity['max_abs_diff']:.3g}")
        worst = max(parity["max_abs_diff"], parity["model_max_abs_diff"])
        if not worst <= float(cfg.tolerance):
            raise UserError(
                f"parity check failed: the exported model's probabilities differ from PyTorch's by {worst:.3g} "
                f"> tolerance={cfg.tolerance} (model alone: {parity['model_max_abs_diff']:.3g}); nothing was written"
            )
        tmp["report"].write_text(json.dumps(result, indent=2))
        _replace_all([(tmp[k], final[k]) for k in ("model", "preprocess", "report")])
    finally:
        for path in tmp.values():
            with contextlib.suppress(OSError):  # the first error is the one to report
                path.unlink(missing_ok=True)
    for key in ("max_abs_diff", "model_max_abs_diff", "preprocess_max_abs_diff", "top1_agreement"):
        print(f"{key:>24}: {result[key]:.3g}")
    print(f"exported {final['model']} (+ preprocess.json, export.json)")
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_cli(export, cfg)


if __name__ == "__main__":
    main()
