"""Configs: every option of every group composes and builds its data; overlays are diffs that do not leak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import SMALL, compose_cfg, make_fashion_tasks
from omegaconf import OmegaConf

from visiontune.build import build_datamodule
from visiontune.cli import CONF_DIR
from visiontune.train import train

CONF = Path(CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEBUG = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))
GROUPS = {
    g: sorted(p.stem for p in (CONF / g).glob("*.yaml") if not p.stem.startswith("_"))
    for g in ("data", "model", "finetune", "optimizer", "scheduler", "augment", "trainer", "logger")
}
FILE_DATA = {"imagefolder", "csv"}


def write_tiny_folder(root: Path) -> Path:
    """A 2-class image folder and the same images as a CSV list, for the file datasets."""
    from PIL import Image

    rows = ["path,label"]
    for c, value in (("a", 40), ("b", 200)):
        (root / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 16), (value, i * 10, 0)).save(root / "train" / c / f"{i}.png")
            rows.append(f"train/{c}/{i}.png,{c}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def small_data(option: str, tmp_path: Path) -> list[str]:
    """Overrides that keep the data of `option` small and local."""
    if option in FILE_DATA:
        root = write_tiny_folder(tmp_path / "ds")
        return [
            f"data.root={root if option == 'imagefolder' else root / 'train.csv'}",
            "data.val_fraction=0.25",
        ]
    if option in ("mnist", "cifar10", "cifar100"):  # not on this machine: compose only, no download
        return []
    if option == "shards":  # the tiny folder, written as shards at the run's size
        from test_shards import write

        root = write_tiny_folder(tmp_path / "ds")
        write(tmp_path, tmp_path / "shards", "data=imagefolder", f"data.root={root}", "data.val_fraction=0.25",
              "data.image_size=32")  # fmt: skip
        return [f"data.root={tmp_path / 'shards'}"]
    return ["data.train_subset=20", "data.val_subset=10", "data.test_subset=10"]


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_builds_its_data(group, option, tmp_path):
    extra = (
        small_data(option, tmp_path) if group == "data" else ["data.train_subset=20", "data.test_subset=10"]
    )
    cfg = compose_cfg([f"{group}={option}", "data.image_size=32", *extra], tmp_path)
    OmegaConf.resolve(cfg)
    assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)
    if group == "data" and option in ("mnist", "cifar10", "cifar100"):
        assert cfg.data.name == option and cfg.data.crop_pct == 1.0
        return
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    image, label = datamodule.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < datamodule.num_classes
    eval_image, _ = datamodule.val_set[0]
    assert eval_image.shape == (3, 32, 32)


# The groups whose options build on a base: each has conf/<group>/_base.yaml, named the same way everywhere.
BASED = ("data", "model", "finetune", "optimizer", "scheduler", "augment", "trainer", "logger", "task")


def leaves(node: dict, prefix: str = "") -> dict:
    """A nested mapping as {dotted key: value}."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def own_values(group: str, name: str) -> dict:
    text = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
    return leaves({k: v for k, v in text.items() if k != "defaults"})


def inherited(group: str, name: str) -> dict:
    """The values of conf/<group>/<name>.yaml with its bases merged under them (strong -> ... -> _base)."""
    text = yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}
    values: dict = {}
    for parent in text.get("defaults", []):
        values.update(own_values(group, name) if parent == "_self_" else inherited(group, parent))
    return values or own_values(group, name)


def test_option_files_name_their_base_and_say_only_what_differs():
    """Each option of a group is a diff: `defaults: [<base>, _self_]`, a chain that ends at the group's
    `_base`, and no value repeated from what it inherits."""
    for group in BASED:
        assert (CONF / group / "_base.yaml").is_file(), f"{group} has no _base.yaml"
        assert "_base" not in GROUPS.get(group, []), group
        for path in sorted((CONF / group).glob("*.yaml")):
            if path.stem == "_base":
                continue
            text = yaml.safe_load(path.read_text()) or {}
            assert text.get("defaults") and text["defaults"][-1] == "_self_", f"{path} names no base"
            parent, chain = text["defaults"][0], [path.stem]
            while parent != "_base":  # e.g. strong -> random_erasing -> flip -> _base
                assert parent not in chain, f"{path}: a loop of bases {chain}"
                chain.append(parent)
                parent = yaml.safe_load((CONF / group / f"{parent}.yaml").read_text())["defaults"][0]
            base = inherited(group, text["defaults"][0])
            for key, value in own_values(group, path.stem).items():
                assert base.get(key, object()) != value, f"{path}: {key} repeats the value it inherits"


def test_the_bases_leave_the_name_to_their_options():
    """A base is not an option: its name (where the group has one) is ??? until an option sets it."""
    for group in ("finetune", "optimizer", "scheduler", "augment", "data", "task"):
        values = own_values(group, "_base")
        assert values.get("name", values.get("task.name")) == "???", group
    assert own_values("trainer", "_base")["accelerator"] == "???"


def test_every_key_is_explained_once_where_it_is_defined():
    """A key's comment lives in the file that defines it: no two files of a group carry the same comment."""
    for group in BASED:
        seen: dict[str, Path] = {}
        for path in sorted((CONF / group).glob("*.yaml")):
            for line in path.read_text().splitlines():
                if line.strip().startswith("#") and len(line) > 30 and not line.startswith("# @package"):
                    assert line not in seen, f"{path} repeats a comment of {seen.get(line)}: {line}"
                    seen[line] = path


def test_the_default_experiment_does_not_leak_into_your_own_data(tmp_path):
    """`data=imagefolder data.root=DIR` trains on all of DIR at the backbone's size for the generic epochs."""
    fmnist = compose_cfg(["experiment=fashion_mnist_lite0"], tmp_path)
    mine = compose_cfg(["data=imagefolder", "data.root=/some/dir"], tmp_path)
    assert (fmnist.data.train_subset, fmnist.data.image_size, fmnist.trainer.max_epochs) == (10000, 64, 2)
    assert mine.data.train_subset is None and mine.data.image_size is None
    assert mine.trainer.max_epochs == 10 and mine.data.root == "/some/dir" and mine.data.name == "imagefolder"
    # the experiment picks its own data and model groups (`override /data:`), whatever train.yaml defaults to
    overlay = yaml.safe_load((CONF / "experiment" / "fashion_mnist_lite0.yaml").read_text())
    assert {"override /data": "fashion_mnist"} in overlay["defaults"]
    assert {"override /model": "efficientnet_lite0"} in overlay["defaults"]
    assert fmnist.data.name == "fashion_mnist" and fmnist.model.backbone == "efficientnet_lite0"


def test_overfit_debug_selects_augment_none_as_a_group(tmp_path):
    """A group override replaces the whole preset: no keys of another preset are left over."""
    overlay = yaml.safe_load((CONF / "debug" / "overfit.yaml").read_text())
    assert {"override /augment": "none"} in overlay["defaults"] and "augment" not in overlay
    cfg = compose_cfg(["debug=overfit"], tmp_path)
    assert OmegaConf.to_container(cfg.augment) == {"name": "none", "mixup_alpha": 0.0, "cutmix_alpha": 0.0}


@pytest.mark.parametrize("overlay", [f"experiment={e}" for e in EXPERIMENTS] + [f"debug={d}" for d in DEBUG])
def test_every_experiment_and_debug_overlay_runs(overlay, tmp_path):
    overrides = [overlay, "data.image_size=32", "model.pretrained=false", "data.train_subset=32",
                 "data.val_subset=16", "data.test_subset=16", "data.batch_size=8", f"model.backbone={SMALL}"]  # fmt: skip
    if overlay.startswith("experiment="):
        overrides.append("debug=fast")
    csv_folder = {
        "experiment=fashion_mnist_multitask": "multitask",
        "experiment=fashion_mnist_mosaic": "mosaic",
    }
    if overlay in csv_folder:  # their CSVs and images come from scripts/make_fashion_tasks.py
        overrides.append(
            f"data.root={make_fashion_tasks(tmp_path / 'tasks', 32, 16, 16) / csv_folder[overlay]}"
        )
    else:
        overrides += ["trainer.max_epochs=1"] if overlay != "debug=fast" else []
    cfg = compose_cfg(overrides, tmp_path)
    train(cfg)
    assert (tmp_path / "metrics.json").is_file()


def test_eval_accepts_every_data_key_without_redeclaring_the_schema(tmp_path):
    """`python -m visiontune.eval data.<key>=...` takes the keys of the data group's base, not a copy."""
    assert "data" not in (yaml.safe_load((CONF / "eval.yaml").read_text()) or {})
    eval_keys = set(compose_cfg(["ckpt_path=x"], tmp_path, config_name="eval").data)
    for option in GROUPS["data"]:
        cfg = compose_cfg([f"data={option}"], tmp_path)
        assert set(cfg.data) <= eval_keys, set(cfg.data) - eval_keys
