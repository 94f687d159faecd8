"""Shared fixtures (the helpers they use live in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config
from tests.tiny_checkpoint import TinyRun, tiny_run


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The tiny trained checkpoint of tests/tiny_checkpoint.py (trained once per process)."""
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir per test session: the tiny synthetic set is generated once and reused."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def cfg_train(tmp_path: Path, shared_data_dir: Path) -> Iterator[DictConfig]:
    yield compose_config("train", TINY_OVERRIDES + TINY_DATA_OVERRIDES, tmp_path, shared_data_dir)
    GlobalHydra.instance().clear()
