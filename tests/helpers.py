"""Test helpers: compose Hydra configs like `train.py` does, redirected into tmp dirs.

Every test run is offline and tiny: the synthetic set is generated with a handful of images,
encoders are the smallest real torchvision/transformers models, and nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from vqa.config_schema import register_schemas
from vqa.utils.project import CONFIG_DIR, compose_run_config

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

# The smallest real composition: synthetic data with a few dozen images, ResNet-18 stages at
# 32 px, a two-layer BERT, small fusion. Shared by every test that trains.
TINY_OVERRIDES: list[str] = [
    "model/visual=resnet18",
    "model/text=bert_tiny",
    "fusion.hidden_dim=32",
    "head.hidden_dim=32",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.log_every_n_steps=1",
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
    "extras.print_config=false",
]
# A synthetic set small enough to generate in about a second.
TINY_DATA_OVERRIDES: list[str] = [
    "data.source.num_train_images=8",
    "data.source.num_val_images=4",
    "data.source.num_test_images=2",
    "data.source.questions_per_image=4",
    "data.source.image_size=32",
    "data.image_size=32",
    "data.num_workers=0",
    "data.batch_size=8",  # two whole images per grouped batch: BatchNorm needs more than one
]


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
