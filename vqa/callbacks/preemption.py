"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it kills or requeues a job) saves
``last.ckpt`` at the next step boundary, then ends the run at once.

A signal handler must not write a checkpoint itself: it can fire in the middle of an optimizer
step or a collective. It only raises a flag; the write happens after the current batch, where
the state is consistent, and all ranks agree on it. A handler that was installed before (the
submitit launcher's, which requeues the job, or Lightning's SLURM one) is then called, so
requeueing still happens, after the checkpoint exists. The run then ends by raising
:class:`Preempted` rather than through ``trainer.should_stop``, which would first run a full
validation (and wait for ``min_epochs``): the grace period before the kill is short.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import Callback

from vqa.callbacks.run_checkpoint import RunCheckpoint
from vqa.data.loader import PREEMPTION_SIGNALS

log = logging.getLogger(__name__)

Handler = Callable[[int, FrameType | None], Any] | int | None


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; ``vqa.cli.train`` exits 128 + signum, as a
    process killed by that signal would, so job schedulers see an unfinished run."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(f"preempted by {signal.Signals(signum).name}; saved {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class PreemptionCheckpoint(Callback):
    """On one of ``signals``: write ``last.ckpt`` after the current batch, then raise
    :class:`Preempted`.

    Its handlers are installed in ``on_train_start``, over Lightning's own (registered once
    fit has started), which would end the run on SIGTERM at the next epoch end or validation
    batch without a checkpoint: those run only after the checkpoint is written, as the earlier
    handlers they are. (Not a ``Checkpoint`` subclass: Lightning refuses those with
    ``enable_checkpointing=False``.)
    """

    def __init__(self, signals: Sequence[str] = tuple(s.name for s in PREEMPTION_SIGNALS)) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self._pending: int | None = None
        self._previous: dict[int, Handler] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._pending = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker): no handler
                log.warning("Preemption handling is off: signals need the main thread.")
                return

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: BaseException):
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # Every rank must take the same branch: the checkpoint write is a collective.
        stop = trainer.strategy.reduce_boolean_decision(self._pending is not None, all=False)
        if not stop:
            return
        signum = self._pending if self._pending is not None else int(signal.SIGTERM)
        self._pending = None
        path = None
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, RunCheckpoint):
                path = cb.write_last(trainer)
        if path is None:
            log.warning(
                "Preempted, but no RunCheckpoint with save_last is configured: nothing saved."
            )
        log.warning(
            "Received %s at step %d: saved %s. Resume with ckpt_path=last and the same "
            "paths.output_dir.",
            signal.Signals(signum).name,
            trainer.global_step,
            path,
        )
        previous = self._previous.get(signum)
        self._restore()
        if callable(previous):
            previous(signum, None)  # e.g. submitit's requeue, now that the checkpoint exists
        raise Preempted(signum, path)
