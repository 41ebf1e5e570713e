"""Shared fixtures: Hydra-composed configs for tiny, fast runs."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TINY, compose_cfg

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_cfg(tmp_path):
    """A composer: tiny_cfg(*overrides) -> cfg for a seconds-long run into tmp_path."""

    def make(*overrides: str):
        return compose_cfg([*TINY, *overrides], tmp_path)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """One tiny trained checkpoint (resnet18, 1 epoch) shared by the after-training tests."""
    from helpers import train_tiny_checkpoint

    return train_tiny_checkpoint(tmp_path_factory.mktemp("tiny_run"))
