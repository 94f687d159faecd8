"""Where the project lives, and the run-wide switches of the `extras` config node."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from omegaconf import DictConfig

from vqa.utils.rich_config import print_config_tree

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def set_project_root() -> Path:
    """Anchor `paths.root_dir` (data/, logs/) at the checkout, whatever the working directory.

    An explicit PROJECT_ROOT in the environment wins, so installed copies can point elsewhere.
    """
    return Path(os.environ.setdefault("PROJECT_ROOT", str(CONFIG_DIR.parent)))


def apply_extras(cfg: DictConfig) -> None:
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        # Known-harmless chatter from dependencies; our own warnings still show.
        for module in (
            "pytorch_lightning",
            "lightning_fabric",
            "torch",
            "transformers",
            "datasets",
        ):
            warnings.filterwarnings("ignore", module=module)
    if extras.get("print_config"):
        print_config_tree(cfg)
