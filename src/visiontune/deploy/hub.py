"""The Hugging Face folder of a trained model (`visiontune-export format=hf`), its model card, and the push.

`<out_dir>/hf/` holds:

- `model.safetensors`: the whole model's state dict (backbone and head, LoRA tensors included);
- `config.json`: what a reader needs (backbone, classes, `id2label`, the task's heads, preprocessing as in
  preprocess.json, temperature) and what rebuilds the model exactly: the checkpoint's
  `hyper_parameters` (and a pruned model's `structure`), written by `training.checkpoints.write_hub_files`;
- `README.md`: the model card, with Hub front matter, the evaluation table, the training config, the
  intended use and the limits;
- `confusion_matrix.png`, when the checkpoint's eval run has one, and `metrics.json`, the card's table as data.

`ckpt_path=<out_dir>/hf` opens it in eval, predict, serve, export and compress as it opens a checkpoint
(`training.checkpoints.read_hub_folder`). The folder is written under a temporary name, checked by loading
it back (the same probabilities as the checkpoint on the parity images), and only then renamed into place.
`push=true repo_id=<org>/<name>` uploads it (`HfApi.create_repo` and `upload_folder`); a failed push is one
line, and the folder stays written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import yaml

from visiontune.data.temporaries import owner_tag, remove_stale, temp_path, write_json
from visiontune.deploy.session import InferenceSession
from visiontune.errors import UserError, one_line
from visiontune.training.checkpoints import HUB_FILES, is_remote, load_checkpoint, write_hub_files

log = logging.getLogger("visiontune")
HUB_FOLDER = "hf"
CARD, CONFUSION = "README.md", "confusion_matrix.png"
EVAL_METRICS = ("test/", "val/")  # the metrics.json keys the card's table shows


def check_push(cfg) -> str | None:
    """The repo id to push to (None without push), checked before any export work: push=true needs
    format=hf and a repo_id that the Hub accepts."""
    repo_id, push = cfg.get("repo_id"), cfg.get("push", False)
    if not isinstance(push, bool):
        raise UserError(f"push={push} must be true or false")
    if repo_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(str(repo_id))
        except HFValidationError as exc:
            raise UserError(f"repo_id={repo_id!r} is not a Hub repo id: {one_line(exc)}") from None
    if push and str(cfg.format) != "hf":
        raise UserError(f"push=true uploads the Hugging Face folder, not format={cfg.format}. Fix: format=hf")
    if push and repo_id is None:
        raise UserError("push=true needs the repo to push to. Fix: repo_id=<your name or org>/<model name>")
    return str(repo_id) if push else None


# -- what the card reports
def eval_outputs(ckpt_path, eval_dir) -> tuple[dict, Path | None, Path | None]:
    """(metrics, the metrics.json they come from, confusion_matrix.png or None) of a checkpoint: from
    `eval_dir` when given, else beside the checkpoint (an eval run's calibrated.ckpt) or in the run dir
    above its checkpoints/ folder (the training run's test metrics)."""
    if eval_dir:
        folder = Path(str(eval_dir)).expanduser()
        if not (folder / "metrics.json").is_file():
            raise UserError(
                f"eval_dir={eval_dir} has no metrics.json. Fix: eval_dir=<the run dir of visiontune-eval>"
            )
        candidates = [folder]
    elif is_remote(ckpt_path):
        candidates = []
    else:
        path = Path(str(ckpt_path))
        candidates = [path.parent, path.parent.parent] if path.is_file() else [path]
    for folder in candidates:
        source = folder / "metrics.json"
        if source.is_file():
            try:
                metrics = json.loads(source.read_text())
            except (OSError, ValueError):
                continue
            confusion = folder / CONFUSION
            return metrics, source, confusion if confusion.is_file() else None
    return {}, None, None


def metrics_table(metrics: dict) -> list[str]:
    rows = [(k, v) for k, v in sorted(metrics.items()) if k.startswith(EVAL_METRICS) and _is_number(v)]
    if not rows:
        return []
    return [
        "| metric | value |",
        "|---|---:|",
        *(f"| {k} | {v if isinstance(v, int) else f'{v:.4f}'} |" for k, v in rows),
    ]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def described(session: InferenceSession, spec: dict) -> dict:
    """config.json's part for readers: the backbone, classes, heads, preprocessing and temperature."""
    names = session.class_names
    return {
        "architecture": str(session.model.hparams.model["backbone"]),
        "pipeline_tag": "image-classification",
        "num_labels": len(names),
        "class_names": names,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "task": session.task,
        "temperature": session.temperature,
        "preprocessing": spec,
    }


def model_card(session: InferenceSession, hparams: dict, card: dict) -> str:
    """README.md: Hub front matter, then what the model is, how well it did, how to use it, its training
    config, and what it is not for. `card`: metrics, metrics_source, confusion (bool), repo_id, license."""
    backbone = str(hparams["model"]["backbone"])
    data = hparams.get("data") or {}
    task, heads = session.task["name"], session.task["heads"]
    tags = ["image-classification", "visiontune", "pytorch", "safetensors"]
    tags += ["timm"] if backbone.startswith("timm:") else []
    front = {"library_name": "visiontune", "license": card["license"], "pipeline_tag": "image-classification",
             "tags": tags}  # fmt: skip
    for prefix in ("timm:hf_hub:", "timm:hf-hub:"):
        if backbone.startswith(prefix):
            front["base_model"] = backbone[len(prefix) :].partition("@")[0]
    repo_id = card.get("repo_id")
    title = (
        repo_id.rpartition("/")[2] if repo_id else f"{backbone} fine-tuned on {data.get('name', 'images')}"
    )
    classes = ", ".join(f"`{c}`" for c in session.class_names)
    outputs = ", ".join(f"{h['name']}: {len(h['classes'])} {h['kind']} classes" for h in heads)
    outputs = f"{len(heads[0]['classes'])} classes" if task == "multiclass" else outputs
    spec = session.export_spec("logits")
    resize = spec["resize"]
    resize = (f"resize to {resize['size'][0]}x{resize['size'][1]} px" if resize["mode"] == "exact"
              else f"resize the shorter side to {resize['size']} px")  # fmt: skip
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"An image classifier fine-tuned with [visiontune](https://pypi.org/project/visiontune/): the backbone "
        f"`{backbone}` (its top removed) with a new head, task `{task}` "
        f"({outputs}), trained on "
        f"`{data.get('name', '?')}`.",
        "",
        f"Classes, in output order: {classes}.",
        "",
        "## Evaluation",
        "",
    ]
    table = metrics_table(card["metrics"])
    if table:
        source = card["metrics_source"]
        lines += [*table, "", f"From `{source.parent.name}/{source.name}`, of the run that trained or evaluated "
                  "the checkpoint."]  # fmt: skip
    else:
        lines.append("No evaluation metrics were found beside the checkpoint. Run `visiontune-eval` and export "
                     "again with `eval_dir=<its run dir>`.")  # fmt: skip
    if card["confusion"]:
        lines += ["", "![confusion matrix](confusion_matrix.png)"]
    folder = repo_id.rpartition("/")[2] if repo_id else "hf"
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "pip install visiontune",
        *([f"hf download {repo_id} --local-dir {folder}"] if repo_id else []),
        f"visiontune-predict ckpt_path={folder} inputs=path/to/images   # predictions.csv",
        f"visiontune-serve ckpt_path={folder} port=8000                 # POST /predict",
        "```",
        "",
        "```python",
        "from PIL import Image",
        "from visiontune.deploy.session import InferenceSession",
        "",
        f'session = InferenceSession.from_checkpoint("{folder}", "cpu")',
        'probabilities = session([Image.open("image.png").convert("RGB")])  # (1, outputs), numpy',
        "```",
        "",
        f"Preprocessing (in `config.json`, `preprocessing`): RGB, {resize}, centre crop "
        f"{spec['crop']['size'][0]} px, {spec['interpolation']} interpolation, scale to [0, 1], normalise with "
        f"mean {spec['mean']} and std {spec['std']}. Probabilities are softmax(logits / T) per multiclass "
        f"head (sigmoid per label of a multilabel head), T = {session.temperature:.4g}"
        f"{' (calibrated)' if session.temperature != 1.0 else ' (not calibrated)'}.",
        "",
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(hparams, sort_keys=False).rstrip(),
        "```",
        "",
        "## Intended use and limits",
        "",
        f"- Intended use: sorting images like those of `{data.get('name', 'its training data')}` into the "
        "classes above, and as a starting point for further fine-tuning.",
        "- It knows only these classes: every image gets a label among them, also one that shows none of them; "
        "images unlike the training data (other cameras, lighting, sizes, domains) can be classified wrongly "
        "with high confidence.",
        "- The figures above hold for the test split it was evaluated on; measure it on your own data before "
        "you rely on it. Biases of the pretrained backbone's data and of the training data carry over.",
        "- Not for decisions about people, nor for safety-critical use without an evaluation of its own.",
        "",
    ]
    return "\n".join(lines)


# -- the folder
def model_checkpoint(session: InferenceSession, ckpt_path) -> dict:
    """The checkpoint behind the session; for an adapter file, the assembled model's own state."""
    if str(ckpt_path).endswith(".safetensors"):
        model = session.model
        return {
            "state_dict": model.state_dict(),
            "hyper_parameters": json.loads(json.dumps(dict(model.hparams))),
        }
    return load_checkpoint(ckpt_path)


def write_folder(session: InferenceSession, cfg, folder: Path) -> dict:
    """model.safetensors, config.json, README.md (and confusion_matrix.png) into `folder`; the card's inputs."""
    checkpoint = model_checkpoint(session, cfg.ckpt_path)
    folder.mkdir(parents=True)
    write_hub_files(checkpoint, folder, described(session, session.export_spec("logits")))
    metrics, source, confusion = eval_outputs(cfg.ckpt_path, cfg.get("eval_dir"))
    if confusion is not None:
        shutil.copyfile(confusion, folder / CONFUSION)
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(EVAL_METRICS) and _is_number(v)}
    if shown:  # the card's table as data too: serve's page shows it for ckpt_path=<folder>
        (folder / "metrics.json").write_text(json.dumps(shown, indent=2) + "\n")
    card = {"metrics": metrics, "metrics_source": source, "confusion": confusion is not None,
            "repo_id": cfg.get("repo_id"), "license": str(cfg.get("license") or "other")}  # fmt: skip
    (folder / CARD).write_text(model_card(session, checkpoint["hyper_parameters"], card))
    return card


def folder_parity(folder: Path, session: InferenceSession, images) -> dict:
    """The folder loaded back (as ckpt_path=<folder> does) against the checkpoint, on the same images."""
    reloaded = InferenceSession.from_checkpoint(folder, "cpu")
    batch = torch.stack([session.transform(image) for image in images])
    expected, got = session.predict_batch(batch).numpy(), reloaded.predict_batch(batch).numpy()
    diff = float(abs(got - expected).max())
    return {"max_abs_diff": diff, "model_max_abs_diff": diff, "preprocess_max_abs_diff": 0.0,
            "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean()), "parity_images": len(images)}  # fmt: skip


def export_folder(cfg, session: InferenceSession, images, out_dir: Path) -> dict:
    """Write `<out_dir>/hf` (under a temporary name, renamed once it loads back with the checkpoint's
    probabilities) and export.json; push it when asked. Returns export.json's content."""
    repo_id = check_push(cfg)
    final, report = out_dir / HUB_FOLDER, out_dir / "export.json"
    remove_stale(out_dir, [f".{HUB_FOLDER}.*tmp", ".export.json.*tmp"], "export")
    tmp, old = temp_path(final), final.with_name(f".{HUB_FOLDER}.old{owner_tag()}")
    try:
        card = write_folder(session, cfg, tmp)
        parity = folder_parity(tmp, session, images)
        print(f"parity on {parity['parity_images']} test images: max_abs_diff {parity['max_abs_diff']:.3g}")
        if not parity["max_abs_diff"] <= float(cfg.tolerance):
            raise UserError(
                f"parity check failed: the folder loads back with probabilities {parity['max_abs_diff']:.3g} away "
                f"from the checkpoint's > tolerance={cfg.tolerance}; nothing was written"
            )
        replace_folder(tmp, final, old)
    finally:
        for path in (tmp, old):
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    result = {"format": "hf", "model": str(final), "files": sorted(p.name for p in final.iterdir()),
              "ckpt_path": str(cfg.ckpt_path), "temperature": session.temperature, "tolerance": float(cfg.tolerance),
              "card_metrics": str(card["metrics_source"]) if card["metrics_source"] else None, **parity}  # fmt: skip
    write_json(report, result, indent=2)
    print(f"exported {final} ({', '.join(result['files'])}) (+ export.json)")
    if repo_id:
        result["pushed"] = push_folder(final, repo_id, bool(cfg.get("private", True)))
        write_json(report, result, indent=2)
    return result


def replace_folder(new: Path, final: Path, aside: Path) -> None:
    """Rename `new` to `final`; an old `final` (a folder cannot be renamed over a full one) is moved to
    `aside` first, and back when the rename fails."""
    if final.exists():
        os.replace(final, aside)
    try:
        os.replace(new, final)
    except OSError:
        if aside.exists():
            os.replace(aside, final)
        raise


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Upload the folder's files to the model repo `repo_id` (created when missing); its URL. Offline, not
    logged in, or refused: one line, and the folder stays where it was written."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    later = f"The folder is written: {folder}; push it later with `hf upload {repo_id} {folder} .`"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="visiontune-export format=hf",
            allow_patterns=[*HUB_FILES, CARD, CONFUSION],
        )  # fmt: skip
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        why = (
            "not authorised: log in with `hf auth login`, or set HF_TOKEN to a token with write access"
            if status in (401, 403)
            else one_line(exc, 160)
        )
        raise UserError(f"push to {repo_id} failed (HTTP {status}): {why}. {later}") from None
    except Exception as exc:  # offline, DNS, proxy, timeout: whatever the HTTP client raises
        if not isinstance(exc, OSError) and not type(exc).__module__.startswith(
            ("httpx", "requests", "urllib3")
        ):
            raise
        raise UserError(
            f"push to {repo_id} failed: {constants.ENDPOINT} cannot be reached ({type(exc).__name__}: "
            f"{one_line(exc, 100)}). {later}"
        ) from None
    url = getattr(commit, "repo_url", None) or f"{constants.ENDPOINT}/{repo_id}"
    print(f"pushed {folder} to {url}")
    return str(url)
