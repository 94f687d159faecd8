"""Test helpers: compose Hydra configs like `train.py` does, redirected into tmp dirs.

Every test run is offline and tiny: the synthetic set is generated with a handful of images,
encoders are the smallest real torchvision/transformers models, and nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from vqa.config_schema import register_schemas
from vqa.utils.project import (
    CONFIG_DIR,
    TINY_MODEL_OVERRIDES,
    compose_run_config,
)
from vqa.utils.project import (
    TINY_DATA_OVERRIDES as TINY_DATA_OVERRIDES,  # re-exported for the tests
)

ROOT = CONFIG_DIR.parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
# Never reach for a hub or a wandb server from a test, whatever the machine's network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread per test process: pytest-xdist already runs one process per core, and a
# second thread only waits for a busy core on a shared machine.
torch.set_num_threads(1)
register_schemas()

# The tiny composition (vqa.utils.project) with the trainer settings every training test shares.
TINY_OVERRIDES: list[str] = [
    *TINY_MODEL_OVERRIDES,
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.log_every_n_steps=1",
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
    "extras.print_config=false",
]


def train_cli(
    tmp_path: Path, *args: str, multirun: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a child process on the tiny composition, with its data and
    logs under ``tmp_path``."""
    command = [
        sys.executable,
        "train.py",
        *(["-m"] if multirun else []),
        *TINY_OVERRIDES,
        *TINY_DATA_OVERRIDES,
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *args,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def train_multirun_in_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_dir: Path, *args: str
) -> Path:
    """``python train.py -m ARGS`` in this process (Hydra's basic launcher runs the jobs in
    turn; a job's error is raised, not turned into an exit code); returns the sweep folder."""
    from vqa.cli.train import main

    sweep = tmp_path / "sweep"
    argv = [
        "train.py",
        "-m",
        *args,
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={sweep}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # raise job errors instead of sys.exit(1)
    GlobalHydra.instance().clear()
    try:
        main()
    finally:
        GlobalHydra.instance().clear()
    return sweep


def same_state(a: Any, b: Any) -> bool:
    """Bit-equal tensors, or lists of them (a metric's list states in a state dict)."""
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same_state, a, b))
    return torch.equal(a, b)


def compose_config(
    config_name: str,
    overrides: Sequence[str] = (),
    tmp_path: Path | None = None,
    data_dir: Path | None = None,
) -> DictConfig:
    """Compose `configs/<config_name>.yaml` as the CLI would, with outputs under tmp_path."""
    cfg = compose_run_config(
        config_name, overrides, None if tmp_path is None else tmp_path / "output"
    )
    with open_dict(cfg):
        if tmp_path is not None:
            cfg.paths.log_dir = str(tmp_path / "logs")
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    return cfg


def fit_steps(
    cfg: DictConfig, callbacks: Sequence[Any], max_steps: int, limit_val_batches: int = 0
) -> tuple[Any, Any]:
    """Fit ``max_steps`` training batches of the composed run with ``callbacks`` only (no logger,
    checkpointing, progress bar or sanity check), seeded as ``train.py`` seeds; returns
    ``(trainer, module)``."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from vqa.cli.train import build_components

    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, module = build_components(cfg)
    trainer = instantiate(
        cfg.trainer,
        callbacks=list(callbacks),
        logger=False,
        max_steps=max_steps,
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, module
