"""``last.ckpt`` that is always the newest state of the run, beside the best one.

Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when it also
writes a top-k checkpoint: after a validation that did not improve the monitored metric, and
at the end of training, ``last.ckpt`` stays at the last improvement, and a resume from it
repeats everything since. Its ``every_n_train_steps`` and ``train_time_interval`` also choose
top-k candidates, on a metric that is stale between validations. Here the best checkpoint is
chosen at validation only, and ``last.ckpt`` is written at every validation, every N optimizer
steps or every T of wall time, and at the end of training, whatever the metric did.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn


def parse_interval(value: str | float | timedelta | None) -> float | None:
    """Seconds from ``"HH:MM:SS"``, ``"DD:HH:MM:SS"``, a number of seconds or a timedelta."""
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    parts = [float(p) for p in str(value).split(":")]
    if not 1 <= len(parts) <= 4:
        raise ValueError(f"train_time_interval={value!r}: expected [[DD:]HH:]MM:SS or seconds")
    seconds = 0.0
    for part, unit in zip(reversed(parts), (1, 60, 3600, 86400), strict=False):
        seconds += part * unit
    return seconds


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch (its own test,
    which it keeps private)."""
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is the newest state; the best stays top-k.

    ``every_n_train_steps`` and ``train_time_interval`` schedule ``last.ckpt`` writes (for
    resuming after a kill), not top-k candidates. Every other argument is ModelCheckpoint's.
    """

    def __init__(
        self,
        *args: Any,
        every_n_train_steps: int | None = None,
        train_time_interval: str | float | timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.last_every_n_steps = every_n_train_steps or 0
        self.last_interval_s = parse_interval(train_time_interval)
        self._last_written_step = -1
        self._last_written_time = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_written_time = time.monotonic()

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step
            self._last_written_time = time.monotonic()

    def write_last(self, trainer: pl.Trainer) -> str | None:
        """Write ``last.ckpt`` now unless it already holds this step; returns its path."""
        if not self.save_last or self._last_written_step == trainer.global_step:
            return self.last_model_path or None
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return None
        # Writing last must not count as this step's save: the validation that may follow at
        # the same step still has to consider its top-k checkpoint.
        saved_step = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved_step
        return self.last_model_path

    def _last_due(self, trainer: pl.Trainer) -> bool:
        if trainer.fit_loop._should_accumulate():  # mid-accumulation: not an optimizer step
            return False
        if validation_follows(trainer):
            # Left to the validation's end: resuming from a checkpoint written now, Lightning
            # would skip that validation (it fast-forwards past it), and with it its metrics
            # and its chance at the best checkpoint.
            return False
        by_steps = (
            self.last_every_n_steps > 0 and trainer.global_step % self.last_every_n_steps == 0
        )
        by_time = False
        if self.last_interval_s is not None:
            by_time = time.monotonic() - self._last_written_time >= self.last_interval_s
            # Ranks' clocks differ; they must agree, or one would wait in a collective alone.
            by_time = bool(trainer.strategy.broadcast(by_time))
        return by_steps or by_time

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if self._last_due(trainer):
            self.write_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.write_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.write_last(trainer)
