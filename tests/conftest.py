"""Shared fixtures: Hydra-composed configs for tiny, fast runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from visiontune.train import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
# Tiny everything: small subsets, small images, random init.
TINY = [
    "data.train_subset=64",
    "data.val_subset=32",
    "data.test_subset=32",
    "data.image_size=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "callbacks.progress.refresh_rate=0",
]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture
def tiny_cfg(tmp_path):
    """A composer: tiny_cfg(*overrides) -> cfg for a seconds-long run into tmp_path."""

    def make(*overrides: str):
        return compose_cfg([*TINY, *overrides], tmp_path)

    return make
