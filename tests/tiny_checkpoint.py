"""One tiny trained checkpoint per test process, shared by the eval, predict and export tests.

Training is the slow part, so it happens once: the first module that asks trains into the
session's base temp folder and later modules find the finished run there (under pytest-xdist
each worker has its own base folder, hence its own run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config
from vqa.cli.train import train

# 64 px images through ResNet-18 up to layer3: a 4x4 attention grid worth plotting (at the
# tiny 32 px the last stage is 1x1), still a few seconds of training.
CHECKPOINT_OVERRIDES = [
    "model.visual.stages=[layer3]",
    "data.source.image_size=64",
    "data.image_size=64",
]
IMAGE_SIZE = 64
GRID = (4, 4)
DONE = "done.json"


@dataclass(frozen=True)
class TinyRun:
    """A finished tiny training run: its best checkpoint, data and test metrics."""

    ckpt: Path
    data_root: Path  # the synthetic set in the VQA v2 layout
    test_metrics: dict[str, float]

    def questions_file(self, split: str) -> Path:
        return self.data_root / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json"

    def annotations_file(self, split: str) -> Path:
        return self.data_root / "Annotations" / f"v2_mscoco_{split}_annotations.json"

    def questions(self, split: str) -> list[dict]:
        return json.loads(self.questions_file(split).read_text())["questions"]

    def image(self, split: str, image_id: int) -> Path:
        return self.data_root / "Images" / "mscoco" / split / f"COCO_{split}_{image_id:012d}.jpg"


def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Train the tiny checkpoint, or reuse the one this process already trained."""
    base = tmp_path_factory.getbasetemp() / "tiny_checkpoint"
    done = base / DONE
    if not done.is_file():
        cfg = compose_config(
            "train",
            [*TINY_OVERRIDES, *TINY_DATA_OVERRIDES, *CHECKPOINT_OVERRIDES],
            base / "run",
            base / "data",
        )
        with open_dict(cfg):
            cfg.test = True  # its test/acc is scored by torchmetrics: a second opinion for eval
        metrics, objects = train(cfg)
        GlobalHydra.instance().clear()
        best = objects["trainer"].checkpoint_callback.best_model_path
        done.write_text(
            json.dumps(
                {
                    "ckpt": best,
                    "data_root": str(base / "data" / "shapes"),
                    "test_metrics": {k: v for k, v in metrics.items() if k.startswith("test/")},
                }
            )
        )
    record = json.loads(done.read_text())
    return TinyRun(Path(record["ckpt"]), Path(record["data_root"]), record["test_metrics"])
