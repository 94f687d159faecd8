"""A callback for the fault-tolerance tests, loaded by `train.py` in a child process
(`+callbacks.probe._target_=tests.fault_probe.StepRecorder`): it appends what each training
step and each validation produced to a JSON-lines file, flushed at once, so a run killed with
SIGKILL leaves the record of every step it finished."""

from __future__ import annotations

import json
import os
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint


class StepRecorder(pl.Callback):
    """Steps and validations, recorded before the checkpoint callbacks run (Lightning calls
    those last), so a kill never loses the record of something a checkpoint holds (a
    preemption, raised by an earlier callback, does: see its test)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write(
            {
                "event": "step",
                "step": trainer.global_step,
                "rank": trainer.global_rank,
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "question_ids": [int(q) for q in batch.question_id],
                "loss": float(loss.detach()),
            }
        )

    def _metrics(self, trainer: pl.Trainer, event: str, prefix: str) -> None:
        """What this event logged (callback_metrics also holds older values, which a resumed
        run, having not logged them itself, does not have)."""
        if trainer.sanity_checking:
            return
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix) and k != "train/loss_step"
        }
        self._write(
            {
                "event": event,
                "step": trainer.global_step,
                "rank": trainer.global_rank,
                "metrics": metrics,
            }
        )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics(trainer, "validation", "val/")


class EpochRecorder(Checkpoint):
    """The epoch's train metrics. A ``Checkpoint`` (it saves nothing) only so that Lightning
    calls its ``on_train_epoch_end`` after the module's, which logs them."""

    def __init__(self, path: str) -> None:
        self.recorder = StepRecorder(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder._metrics(trainer, "epoch_end", "train/")
