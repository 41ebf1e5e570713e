"""Configs: every group option composes, every experiment runs one fast_dev_run batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from visiontune.train import CONF_DIR, train

CONF = Path(CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = {
    g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
    for g in (
        "data",
        "model",
        "finetune",
        "optimizer",
        "scheduler",
        "augment",
        "trainer",
        "logger",
        "debug",
        "hparams_search",
    )
}


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"] + (["data.root=/x"] if option in ("imagefolder", "csv") else [])
    cfg = compose_cfg(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    if group in ("debug", "hparams_search"):  # @package _global_ overlays
        assert cfg.trainer.max_epochs >= 1 and cfg.optimized_metric == "val/acc"
    else:
        assert cfg[group] is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_fast_dev_run(experiment, tmp_path):
    cfg = compose_cfg(
        [f"experiment={experiment}", "debug=fast", "data.image_size=32", "model.pretrained=false",
         "data.train_subset=32", "data.val_subset=16", "data.test_subset=16", "data.batch_size=8",
         "callbacks.progress.refresh_rate=0"],
        tmp_path,
    )  # fmt: skip
    train(cfg)
    assert (tmp_path / "metrics.json").is_file()


def test_eval_data_patch_covers_every_data_key(tmp_path):
    """`python -m visiontune.eval data.<key>=...` must accept every key a data config has."""
    eval_keys = set(compose_cfg(["ckpt_path=x"], tmp_path, config_name="eval").data)
    for option in GROUPS["data"]:
        keys = set(OmegaConf.load(CONF / "data" / f"{option}.yaml"))
        assert keys <= eval_keys, keys - eval_keys
