"""`python -m visiontune.compress ckpt_path=PATH method=int8|prune`: a smaller model, measured against fp32.

- `int8`: post-training static quantization with ONNX Runtime. The fp32 ONNX model comes from
  export.py (parity-checked against PyTorch), onnxruntime's `quant_pre_process` folds BatchNorm and
  infers shapes, and `quantize_static` calibrates the activation ranges (MinMax) on `calib_images`
  training images through the checkpoint's eval transform. Weights are int8 per output channel,
  activations uint8 (U8S8: what ONNX Runtime's x86 kernels run fastest). Without VNNI their u8 x s8
  dot products can saturate, so there `reduce_range=auto` keeps the weights to 7 bits. The final
  Softmax stays float, so close probabilities never tie at 8 bits.
  Writes model.onnx, model.int8.onnx, preprocess.json.
- `prune`: structured channel pruning with torch-pruning: its dependency graph couples every layer
  that shares channels (residual adds, depthwise convolutions, BatchNorm), group L2 magnitude picks
  the channels, `amount` of them go from each group, and the head's outputs never. The layers really
  get narrower. Then `finetune_epochs` of fine-tuning through the ordinary Lightning path (the same
  ImageClassifier, the checkpoint's datamodule, optimizer and scheduler), and the BatchNorm running
  statistics re-measured on up to BN_BATCHES training batches. Writes pruned.ckpt (a
  visiontune checkpoint with its layer shapes: every command loads it, see structure.py),
  model.onnx, model.pruned.onnx (both through export.py), preprocess.json.

compress.json holds one object per model ("fp32" and "int8" or "pruned"): file size, parameters,
MACs, CPU latency per image at batch 1 and 32 (ONNX Runtime with `threads` intra-op threads, the
median of `latency_runs`), test accuracy, plus the top-1 agreement of the two on the test split.
Both models run in the same runtime, ONNX Runtime, so the figures compare.

Everything is written into a temporary folder inside the run dir (`.compress-*.<pid>@<host>.tmp`) and
moved into place at the end (compress.json last): a failure leaves no half-written file, and the input
checkpoint is only read. The folder of a compress that was killed is removed by the next one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from visiontune.cli import CONF_DIR, ONNX_LOGGERS, data_patch, plain, quiet_libraries, run_cli
from visiontune.config import validate_compress_config
from visiontune.data.temporaries import owner_tag, remove_stale
from visiontune.deploy.inference import quiet_warnings
from visiontune.deploy.session import InferenceSession, device_setting, indexed_loader, open_onnx, pick_device
from visiontune.errors import UserError
from visiontune.export import export, parity_indices
from visiontune.models.structure import describe_structure
from visiontune.training.callbacks import RunClock
from visiontune.training.checkpoints import save_atomic
from visiontune.training.module import ImageClassifier

log = logging.getLogger("visiontune")
WARMUP_RUNS = 10
# Pruned layers keep a multiple of 8 channels: ONNX Runtime's blocked (NCHWc) convolutions need it, and
# a model with odd widths ran 10-50x slower there than the unpruned one (measured on Lite0).
CHANNEL_MULTIPLE = 8
# training batches that re-estimate the BatchNorm statistics of the pruned model
BN_BATCHES = 50
CALIB_BATCH = 32
INT8_NOTE = (
    "params and macs are the fp32 graph's: int8 quantization changes the number format, not the "
    "graph's shape (the weights take 1 byte instead of 4)"
)
OUTPUT_FILES = {
    "int8": ("model.onnx", "model.int8.onnx", "preprocess.json"),
    "prune": ("model.onnx", "model.pruned.onnx", "pruned.ckpt", "preprocess.json"),
}


# ------------------------------------------------------------------ the torch model's figures


def conv_channels(model: nn.Module) -> int:
    """Output channels of all convolutions: what structured pruning makes smaller."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def model_figures(model: ImageClassifier, image_size: int) -> dict:
    """Parameters, multiply-accumulates of one image, and conv channels of the network."""
    import torch_pruning as tp

    example = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model.eval(), example)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": int(macs),
        "channels": conv_channels(model),
    }


# ------------------------------------------------------------------ ONNX Runtime


def median_ms_per_image(session, batch: np.ndarray, runs: int) -> float:
    """Median wall time of one run on `batch`, per image, after WARMUP_RUNS untimed runs."""
    feed = {session.get_inputs()[0].name: batch}
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000 / len(batch)


def latency(session, images: np.ndarray, runs: int) -> dict:
    """CPU latency per image at batch 1 and batch 32 (real images, repeated when there are fewer)."""
    batch32 = np.resize(images, (32, *images.shape[1:])).astype(np.float32)
    return {
        "latency_ms_b1": median_ms_per_image(session, batch32[:1], runs),
        "latency_ms_b32": median_ms_per_image(session, batch32, runs),
    }


def test_loader(datamodule, test_subset: int | None) -> DataLoader:
    """The test split (or `test_subset` images spread evenly over it) in order, unreadable files left out."""
    datamodule.setup("test")
    dataset = datamodule.test_set
    if test_subset:
        dataset = Subset(dataset, parity_indices(len(dataset), int(test_subset)))
    return indexed_loader(dataset, like=datamodule.test_dataloader())


def test_predictions(
    sessions: dict, loader: DataLoader
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(top-1 predictions per model, targets, the first images) over the loader, streamed in batches."""
    predictions = {name: [] for name in sessions}
    targets, first = [], None
    for batch in loader:
        if batch is None:  # every item of the batch was unreadable
            continue
        _, images, labels = batch
        array = images.numpy().astype(np.float32)
        first = array if first is None else first
        for name, session in sessions.items():
            out = session.run(None, {session.get_inputs()[0].name: array})[0]
            predictions[name].append(out.argmax(1))
        targets.append(labels.numpy())
    if not targets:
        raise UserError("no readable images in the test split. Fix: check data.root")
    return {k: np.concatenate(v) for k, v in predictions.items()}, np.concatenate(targets), first


def measure(paths: dict[str, Path], loader: DataLoader, threads: int, runs: int) -> tuple[dict, float, int]:
    """({model: size, latency, test_acc}, top-1 agreement of the two models, test images)."""
    sessions = {name: open_onnx(path, threads) for name, path in paths.items()}
    predictions, targets, first = test_predictions(sessions, loader)
    figures = {}
    for name, path in paths.items():
        figures[name] = {
            "file": path.name,
            "size_mb": path.stat().st_size / 1e6,
            **latency(sessions[name], first, runs),
            "test_acc": float((predictions[name] == targets).mean()),
        }
    fp32, other = (predictions[name] for name in paths)
    return figures, float((fp32 == other).mean()), len(targets)


# ------------------------------------------------------------------ export (export.py's code)


def export_onnx(ckpt_path: Path | str, out_dir: Path, patch: dict, tolerance: float) -> dict:
    """model.onnx and preprocess.json of a checkpoint into out_dir, parity-checked (export.py)."""
    cfg = OmegaConf.create(
        {"ckpt_path": str(ckpt_path), "format": "onnx", "output": "probabilities", "out_dir": str(out_dir),
         "paths": {"output_dir": str(out_dir)}, "parity_images": 64, "tolerance": float(tolerance), "opset": None}
    )  # fmt: skip
    result = export(cfg, patch=patch)
    (out_dir / "export.json").unlink(missing_ok=True)  # its figures go into compress.json
    return {"export_max_abs_diff": result["max_abs_diff"]}


# ------------------------------------------------------------------ int8


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over training images, CALIB_BATCH at a time (loaded lazily)."""

    def __init__(self, dataset, indices: list[int], input_name: str):
        self.dataset, self.input_name = dataset, input_name
        self.batches = iter([indices[i : i + CALIB_BATCH] for i in range(0, len(indices), CALIB_BATCH)])

    def get_next(self) -> dict | None:
        for batch in self.batches:
            items = [self.dataset[i] for i in batch]
            images = [item[0] for item in items if item is not None]
            if images:
                return {self.input_name: torch.stack(images).numpy().astype(np.float32)}
        return None


def calibration_indices(n_total: int, n: int, seed: int) -> list[int]:
    """`n` training images drawn without replacement (seeded), in order."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_total, size=min(n, n_total), replace=False).tolist())


@contextlib.contextmanager
def quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def x86_without_vnni(machine: str | None = None, cpuinfo: str | None = None) -> bool:
    """An x86 CPU without VNNI (AVX512-VNNI or AVX-VNNI): its u8 x s8 dot products can saturate."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: unknown, assume a recent CPU
            return False
    flags = set(re.findall(r"[a-z0-9_]+", cpuinfo.lower()))
    return not flags & {"avx512_vnni", "avx_vnni"}


def resolve_reduce_range(setting) -> bool:
    return x86_without_vnni() if setting == "auto" else bool(setting)


def quantize_int8(
    fp32: Path, out: Path, reader, quant_format: str, work: Path, reduce_range: bool = False
) -> None:
    """Static int8 quantization of an fp32 ONNX model (per-channel int8 weights, uint8 activations;
    `reduce_range`: 7-bit weights, for x86 CPUs without VNNI)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "model.prepared.onnx"
    # onnxruntime's advice (on the root logger) and the Python warnings (protobuf's): to the log file
    with quiet_libraries((*ONNX_LOGGERS, "root")):
        try:  # shape inference and graph optimisation (BatchNorm folded into Conv) before quantizing
            quant_pre_process(str(fp32), str(prepared))
        except Exception as exc:  # the quantizer works on the plain export too, just less well
            log.warning(
                "onnxruntime quant_pre_process failed (%s); quantizing the exported model as it is", exc
            )
            shutil.copyfile(fp32, prepared)
        softmax = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Softmax"]
        with quiet_root_logger():  # the quantizer logs every scale it adjusts, at INFO, on the root logger
            quantize_static(
                str(prepared),
                str(out),
                reader,
                quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=softmax,  # float probabilities: 8-bit ones would tie close classes
            )  # MinMax keeps only each batch's per-tensor min and max (reduced inside the graph): small memory
    prepared.unlink()


def compress_int8(cfg: DictConfig, model: ImageClassifier, datamodule, patch: dict, work: Path) -> dict:
    export_figures = export_onnx(cfg.ckpt_path, work, patch, cfg.tolerance)
    datamodule.setup("fit")
    indices = calibration_indices(len(datamodule.train_set), int(cfg.calib_images), model.hparams.seed)
    reader = CalibrationReader(datamodule.train_set, indices, "image")
    start = time.perf_counter()
    reduce_range = resolve_reduce_range(cfg.get("reduce_range", "auto"))
    quantize_int8(
        work / "model.onnx", work / "model.int8.onnx", reader, str(cfg.quant_format), work, reduce_range
    )
    log.info("quantized to int8 in %.0f s (%d calibration images)", time.perf_counter() - start, len(indices))
    figures, agreement, n = measure(
        {"fp32": work / "model.onnx", "int8": work / "model.int8.onnx"},
        test_loader(datamodule, cfg.test_subset),
        int(cfg.threads),
        int(cfg.latency_runs),
    )
    torch_figures = model_figures(model, datamodule.image_size)
    figures["fp32"].update(torch_figures, **export_figures)
    figures["int8"].update(
        torch_figures,
        note=INT8_NOTE,
        quant_format=str(cfg.quant_format),
        activations="uint8",
        weights="int8, per output channel" + (" (7-bit range: reduce_range)" if reduce_range else ""),
        calib_images=len(indices),
    )
    return {**figures, "top1_agreement": agreement, "test_images": n}


# ------------------------------------------------------------------ prune


def kept_channels(channels: int, amount: float) -> int:
    """Channels a layer keeps: `1 - amount` of them, to the nearest multiple of CHANNEL_MULTIPLE (>= one)."""
    if channels % CHANNEL_MULTIPLE:
        return channels  # an odd width (e.g. 3 input colours): torch-pruning's round_to leaves it be
    nearest = round(channels * (1 - amount) / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    return min(channels, max(CHANNEL_MULTIPLE, nearest))


def rounded_ratios(model: nn.Module, amount: float) -> dict[nn.Module, float]:
    """Per-layer pruning ratios that keep `kept_channels` of each layer.

    torch-pruning keeps int(channels * (1 - ratio)) and its round_to rounds that down, so a 16-channel
    layer at amount 0.05 would drop to 8; these ratios make it keep the nearest multiple instead
    (+0.5 channel, so the float product never lands just below the integer).
    """
    ratios = {}
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            kept = kept_channels(channels, amount)
            ratios[module] = max(0.0, 1 - (kept + 0.5) / channels) if kept < channels else 0.0
    return ratios


def prune_channels(model: ImageClassifier, amount: float, image_size: int) -> ImageClassifier:
    """Remove `amount` of the channels of every prunable layer group, in place; the head's outputs stay.

    torch-pruning traces the model once to find the groups of layers that share channels; each group
    is ranked by the L2 norm of its weights (all its layers together) and its weakest channels go.
    """
    import torch_pruning as tp

    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    example = torch.zeros(1, 3, image_size, image_size)
    try:
        pruner = tp.pruner.MetaPruner(
            model.eval(),
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=float(amount),
            pruning_ratio_dict=rounded_ratios(model, float(amount)),
            ignored_layers=linears,  # the head: its class outputs stay (its inputs follow the backbone)
            round_to=CHANNEL_MULTIPLE,
        )
        pruner.step()
        with torch.no_grad():
            model(example)  # a graph pruned wrongly fails here, not later with a raw traceback
    except Exception as exc:  # an architecture whose dependencies torch-pruning cannot trace
        raise UserError(
            f"torch-pruning cannot prune backbone {model.hparams.model['backbone']}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        ) from None
    model.fit_head_to_backbone()
    return model


def finetune(
    model: ImageClassifier,
    datamodule,
    epochs: int,
    trainer_cfg: dict,
    work: Path,
    lr: float | None = None,
    **limits,
) -> dict:
    """Train the (pruned) model for `epochs` on the checkpoint's training data; its final metrics.

    The ordinary Lightning path with the checkpoint's optimizer and scheduler, every layer trainable
    (the checkpoint's freeze strategy protected pretrained features; after pruning the whole network
    has to adapt), keeping its per-group LR keys. `lr`: another head LR (None = the checkpoint's).
    `limits`: extra Trainer arguments (tests: max_steps).
    """
    if lr is not None:
        model.lr = float(lr)  # the head LR; the backbone's follow from it as in training
    model.train_every_layer()
    L.seed_everything(model.hparams.seed, verbose=False)
    with quiet_libraries(
        ("lightning.pytorch", "lightning.fabric")
    ):  # its device lines and tips: to the log file
        trainer = L.Trainer(
            **trainer_cfg,
            max_epochs=epochs,
            default_root_dir=work,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=sys.stdout.isatty(),
            num_sanity_val_steps=0,
            callbacks=[RunClock(print_lines=not sys.stdout.isatty())],
            **limits,
        )
        model.train()  # Lightning keeps the modes it is given: BatchNorm must re-learn its statistics
        trainer.fit(model, datamodule=datamodule)
    model.cpu().eval()
    return {
        k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", "val/loss", "val/acc")
    }


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, max_batches: int = BN_BATCHES) -> int:
    """Re-estimate every BatchNorm's running statistics for the final weights; the images used.

    After pruning (and a short fine-tune) the running averages lag behind the weights: training loss
    falls while eval accuracy stays low. Forward passes in train mode for the norms only (no dropout,
    no gradients) with a cumulative average (momentum None) measure the statistics afresh.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.eval()
    for norm in norms:
        norm.train()
    seen = 0
    for i, batch in enumerate(loader):
        if i >= max_batches or not norms:
            break
        if batch is not None:
            model(batch[0])
            seen += len(batch[0])
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()
    return seen


def save_pruned(model: ImageClassifier, path: Path, pruning: dict) -> None:
    """A visiontune checkpoint of the pruned model: weights, hyperparameters and its layer shapes.

    Plain values only (weights_only=True loads it); `training.checkpoints.load_classifier` narrows the model that
    the hyperparameters describe to `structure` before loading the weights.
    """
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hyper_parameters": dict(model.hparams),
        "structure": describe_structure(model),
        "pruning": pruning,
        "pytorch-lightning_version": L.__version__,
    }
    save_atomic(checkpoint, path)


def compress_prune(cfg: DictConfig, model: ImageClassifier, datamodule, patch: dict, work: Path) -> dict:
    size = datamodule.image_size
    fp32_figures = model_figures(model, size)
    export_figures = export_onnx(cfg.ckpt_path, work, patch, cfg.tolerance)
    prune_channels(model, float(cfg.amount), size)
    log.info(
        "pruned %.0f%% of the channels: %s -> %s parameters",
        100 * float(cfg.amount), f"{fp32_figures['params']:,}", f"{sum(p.numel() for p in model.parameters()):,}",
    )  # fmt: skip
    finetuned = {}
    if int(cfg.finetune_epochs) > 0:
        finetuned = finetune(
            model, datamodule, int(cfg.finetune_epochs), finetune_trainer(cfg), work, cfg.finetune_lr
        )
    datamodule.setup("fit")
    bn_images = recalibrate_batchnorm(model, datamodule.train_dataloader())
    pruning = {"amount": float(cfg.amount), "finetune_epochs": int(cfg.finetune_epochs),
               "finetune_lr": float(model.lr), "bn_recalibration_images": bn_images,
               "source": str(cfg.ckpt_path), "importance": "group L2 magnitude (torch-pruning)",
               "channel_multiple": CHANNEL_MULTIPLE}  # fmt: skip
    save_pruned(model, work / "pruned.ckpt", pruning)
    pruned_dir = work / "pruned_export"
    pruned_dir.mkdir()
    pruned_export = export_onnx(
        work / "pruned.ckpt", pruned_dir, patch, cfg.tolerance
    )  # also proves that it reloads
    os.replace(pruned_dir / "model.onnx", work / "model.pruned.onnx")
    figures, agreement, n = measure(
        {"fp32": work / "model.onnx", "pruned": work / "model.pruned.onnx"},
        test_loader(datamodule, cfg.test_subset),
        int(cfg.threads),
        int(cfg.latency_runs),
    )
    figures["fp32"].update(fp32_figures, **export_figures)
    figures["pruned"].update(
        model_figures(model, size),
        **pruned_export,
        **pruning,
        checkpoint="pruned.ckpt",
        checkpoint_size_mb=(work / "pruned.ckpt").stat().st_size / 1e6,
        finetune={k.replace("/", "_"): v for k, v in finetuned.items()},
    )
    return {**figures, "top1_agreement": agreement, "test_images": n}


# ------------------------------------------------------------------ the command

METHODS = {"int8": compress_int8, "prune": compress_prune}


def finetune_trainer(cfg: DictConfig) -> dict:
    """The prune fine-tune's Trainer arguments: cfg.trainer, on the command's `device`."""
    trainer = {k: v for k, v in plain(cfg.trainer).items() if v is not None}
    return {**trainer, "accelerator": pick_device(device_setting(cfg)).type}


def refuse_overwriting_input(ckpt_path: str, run_dir: Path, method: str) -> None:
    names = (*OUTPUT_FILES[method], "compress.json")
    source = Path(str(ckpt_path)).resolve()
    if any((run_dir / name).resolve() == source for name in names):
        raise UserError(
            f"the run dir {run_dir} would overwrite the input checkpoint {ckpt_path}. Fix: hydra.run.dir=<another folder>"
        )


def print_comparison(result: dict, names: tuple[str, str], run_dir: Path) -> None:
    """One table: each model's size, parameters, MACs, latency and test accuracy."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"visiontune compress ({result['method']}, {result['threads']} threads): {run_dir}")
    for column in ("model", "size MB", "params", "MMACs", "ms/img b1", "ms/img b32", "test acc"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in names:
        m = result[name]
        table.add_row(name, f"{m['size_mb']:.2f}", f"{m['params']:,}", f"{m['macs'] / 1e6:.1f}",
                      f"{m['latency_ms_b1']:.3f}", f"{m['latency_ms_b32']:.3f}", f"{m['test_acc']:.4f}")  # fmt: skip
    Console().print(table)


def compress(cfg: DictConfig, patch: dict | None = None) -> dict:
    """Compress `cfg.ckpt_path` by `cfg.method` into the run dir; returns compress.json's content."""
    quiet_warnings()
    validate_compress_config(cfg)
    method = str(cfg.method)
    run_dir = Path(cfg.paths.output_dir)
    refuse_overwriting_input(cfg.ckpt_path, run_dir, method)
    patch = data_patch(cfg) if patch is None else patch
    session = InferenceSession.from_checkpoint(cfg.ckpt_path, "cpu", patch)
    if [h.kind for h in session.heads] != ["multiclass"]:  # one softmax head: top-1 is defined
        raise UserError(
            f"{cfg.ckpt_path} is a {session.task['name']} checkpoint; compress measures top-1 accuracy and "
            "agreement, so it takes multiclass checkpoints only. Fix: export it with visiontune.export"
        )
    model, datamodule = session.model, session.labelled_data()

    import onnxruntime

    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(run_dir, [".compress-*"], "compress")
    work = Path(tempfile.mkdtemp(prefix=".compress-", suffix=owner_tag(), dir=run_dir))
    try:
        figures = METHODS[method](cfg, model, datamodule, patch, work)
        result = {
            "method": method,
            "ckpt_path": str(cfg.ckpt_path),
            "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider (both models)",
            "threads": int(cfg.threads),
            "latency_runs": int(cfg.latency_runs),
            "latency": "median wall time per image over latency_runs runs after 10 warm-up runs",
            **figures,
        }
        (work / "compress.json").write_text(json.dumps(result, indent=2))
        # an earlier compress.json must not describe the new files if a move fails halfway
        (run_dir / "compress.json").unlink(missing_ok=True)
        for name in (*OUTPUT_FILES[method], "compress.json"):  # compress.json last: the run is complete
            os.replace(work / name, run_dir / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    compressed = "int8" if method == "int8" else "pruned"
    log.info(
        "top-1 agreement fp32 vs %s: %.4f on %d test images",
        compressed,
        result["top1_agreement"],
        result["test_images"],
    )
    print_comparison(result, ("fp32", compressed), run_dir)
    print(
        f"top-1 agreement fp32 vs {compressed}: {result['top1_agreement']:.4f} ({result['test_images']} test images)"
    )
    print(f"wrote {', '.join(OUTPUT_FILES[method])} and compress.json into {run_dir}")
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compress")
def main(cfg: DictConfig) -> None:
    run_cli(compress, cfg)


if __name__ == "__main__":
    main()
