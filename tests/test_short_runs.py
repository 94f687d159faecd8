"""Runs that end before their first validation (max_steps, max_time, an epoch budget shorter
than the validation interval): a single run finishes and says why, a sweeper's trial fails
saying why its objective is missing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import vqa.cli.train
from tests.helpers import (
    TINY_DATA_OVERRIDES,
    TINY_OVERRIDES,
    train_cli,
    train_multirun_in_process,
)


def test_cli_run_stopped_by_max_steps_exits_0_and_says_why(tmp_path: Path) -> None:
    # Sixteen training images: eight steps per epoch, so max_steps=6 ends the fit mid-epoch,
    # before the epoch-end validation.
    done = train_cli(
        tmp_path,
        "fusion=parallel",
        "++trainer.max_steps=6",
        "++trainer.limit_val_batches=2",
        "data.source.num_train_images=16",
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    [line] = [ln for ln in output.splitlines() if "No validation ran" in ln]
    assert "stopped at max_steps=6 before the first validation at step 8" in line
    assert "final weights" in line and "last.ckpt" in line
    assert "optimized_metric='val/acc_best'" in line and "returning None" in line
    [last] = (tmp_path / "logs").glob("train/runs/*/checkpoints/last.ckpt")
    assert str(last) in line


def test_multirun_trial_without_validation_fails_saying_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_data_dir: Path
) -> None:
    with pytest.raises(KeyError) as error:
        train_multirun_in_process(
            monkeypatch,
            tmp_path,
            shared_data_dir,
            *TINY_OVERRIDES,
            *TINY_DATA_OVERRIDES,
            "++trainer.max_steps=2",  # of four steps per epoch
            "trainer.enable_progress_bar=false",
            "test=false",
        )
    message = str(error.value)
    assert "optimized_metric='val/acc_best'" in message
    assert "no validation ran" in message
    assert "max_steps=2 before the first validation at step 4" in message


def test_typo_under_a_sweeper_names_the_logged_metrics() -> None:
    metrics = {"val/acc": 0.5, "val/acc_best": 0.5, "train/loss_epoch": 1.0}
    with pytest.raises(KeyError) as error:
        vqa.cli.train.metric_value(metrics, "val/acc_bset", required=True, no_validation=None)
    message = str(error.value)
    assert "although validation ran" in message
    assert "['train/loss_epoch', 'val/acc', 'val/acc_best']" in message
    assert not message.startswith(("'", '"'))  # the message itself, not a KeyError repr


def test_single_run_without_the_metric_returns_none() -> None:
    assert vqa.cli.train.metric_value({}, "val/acc_best", required=False, no_validation="x") is None
    assert vqa.cli.train.metric_value({"val/acc": 0.5}, "val/acc", required=True) == 0.5


@pytest.mark.parametrize(
    ("hydra_cfg", "sweeping"),
    [
        ({"mode": RunMode.RUN, "sweeper": {"_target_": "x.BasicSweeper"}}, False),
        ({"mode": None, "sweeper": {"_target_": "x.BasicSweeper"}}, False),
        ({"mode": RunMode.MULTIRUN, "sweeper": {"_target_": "x.BasicSweeper"}}, True),
        ({"mode": "MULTIRUN"}, True),
        ({"mode": None, "sweeper": {"_target_": "optuna_sweeper.OptunaSweeper"}}, True),
    ],
)
def test_under_sweeper(hydra_cfg: dict[str, Any], sweeping: bool) -> None:
    assert vqa.cli.train.under_sweeper(OmegaConf.create(hydra_cfg)) is sweeping


# ------------------------------------------------- why no validation ran, on a bare Lightning fit


class Tiny(pl.LightningModule):
    def __init__(self, pause: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.pause = pause

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(self.pause)
        return self.layer(batch[0]).sum()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch[0]).sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path: Path, pause: float = 0.0, **trainer_kwargs: Any) -> pl.Trainer:
    loader = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=2)  # four batches
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(Tiny(pause), loader, loader)
    return trainer


@pytest.mark.parametrize(
    ("trainer_kwargs", "reason"),
    [
        ({"max_steps": 3}, "the run stopped at max_steps=3 before the first validation at step 4"),
        (
            {"max_steps": 3, "accumulate_grad_batches": 2, "check_val_every_n_epoch": 2},
            "the run stopped at max_steps=3 before the first validation at step 4",
        ),
        (
            {"max_epochs": 2, "check_val_every_n_epoch": 3},
            "the run ended at max_epochs=2 (8 steps) before the first validation at step 12",
        ),
        (
            {"max_epochs": 2, "check_val_every_n_epoch": None, "val_check_interval": 10},
            "the run ended at max_epochs=2 (8 steps) before the first validation at step 10",
        ),
        (
            {"max_epochs": 1, "limit_train_batches": 2, "val_check_interval": 3,
             "check_val_every_n_epoch": None},
            "the run ended at max_epochs=1 (2 steps) before the first validation at step 3",
        ),
        ({"max_epochs": 1, "limit_val_batches": 0}, "validation is off (limit_val_batches=0)"),
    ],
)  # fmt: skip
def test_no_validation_reason(tmp_path: Path, trainer_kwargs: dict[str, Any], reason: str) -> None:
    assert vqa.cli.train.no_validation_reason(fit(tmp_path, **trainer_kwargs)) == reason


def test_no_validation_reason_max_time(tmp_path: Path) -> None:
    # Lightning validates at once when a Timer stops the fit in a validation epoch: only a stop
    # in an epoch without validation ends the run unvalidated.
    trainer = fit(
        tmp_path, pause=0.3, max_time={"seconds": 1}, max_epochs=5, check_val_every_n_epoch=2
    )
    reason = vqa.cli.train.no_validation_reason(trainer)
    assert reason is not None
    assert reason.startswith("the run stopped at max_time=0:00:01 after ")
    assert reason.endswith(" steps, before the first validation at step 8")


def test_no_reason_when_validation_ran(tmp_path: Path) -> None:
    assert vqa.cli.train.no_validation_reason(fit(tmp_path, max_epochs=1)) is None
