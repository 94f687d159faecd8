"""RunCheckpoint: last.ckpt is always the newest state, the best stays beside it, and the
step/time schedule writes last.ckpt between validations."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config
from tests.test_training_features import train_with
from vqa.callbacks.run_checkpoint import RunCheckpoint, parse_interval
from vqa.lit_module import check_same_world_size


class LastStepProbe(Checkpoint):
    """After each batch (a Checkpoint, so after RunCheckpoint): the step last.ckpt holds."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int | None]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        held = None
        if last.exists():
            held = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        self.seen.append((trainer.global_step, held))


def tiny(tmp_path: Path, data_dir: Path, *overrides: str):
    return compose_config(
        "train",
        [
            *TINY_OVERRIDES,
            *TINY_DATA_OVERRIDES,
            "model.visual.stages=[layer3]",
            "test=false",
            *overrides,
        ],
        tmp_path,
        data_dir,
    )


def test_last_is_the_newest_state_when_the_metric_stops_improving(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a zero learning rate val/acc never improves after epoch 0: Lightning's save_last
    would leave last.ckpt at epoch 0; it must hold the end of training."""
    cfg = tiny(tmp_path, shared_data_dir, "trainer.max_epochs=3", "optimizer.lr=0.0")
    _, objects = train_with(cfg, monkeypatch)
    trainer = objects["trainer"]
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == trainer.global_step == 12
    assert last["epoch"] == 2
    assert Path(trainer.checkpoint_callback.best_model_path).name == "epoch_000.ckpt"


@pytest.mark.parametrize(
    "schedule",
    [
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.train_time_interval=0",
    ],
    ids=["every_step", "every_0_seconds"],
)
def test_last_between_validations(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, schedule: str
) -> None:
    """Validation at each epoch's end only (4 steps): last.ckpt follows every step; at the
    epoch's last step it waits for that validation (a resume must not skip it)."""
    probe = LastStepProbe()
    cfg = tiny(tmp_path, shared_data_dir, "trainer.max_epochs=2", schedule)
    train_with(cfg, monkeypatch, callbacks=[probe])
    assert [step for step, _ in probe.seen] == list(range(1, 9))
    for step, held in probe.seen:
        assert held == (step - 1 if step % 4 == 0 else step), (step, held)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (90, 90.0),
        ("00:30:00", 1800.0),
        ("1:00:00:05", 86405.0),
        (timedelta(minutes=2), 120.0),
    ],
)
def test_parse_interval(value: Any, seconds: float | None) -> None:
    assert parse_interval(value) == seconds


def test_parse_interval_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="MM:SS or seconds"):
        parse_interval("1:2:3:4:5")
    with pytest.raises(ValueError, match="every_n_train_steps"):
        RunCheckpoint(every_n_train_steps=-1)


def test_resume_on_another_world_size_is_refused() -> None:
    check_same_world_size(2, 2)
    with pytest.raises(RuntimeError, match=r"2 process\(es\).*this run has 1"):
        check_same_world_size(2, 1)
