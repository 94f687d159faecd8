"""A DataLoader that Lightning can checkpoint and resume mid-epoch, and that never draws from
the run's global random stream.

The state (``state_dict()``) is the epoch and the number of batches handed out in it; with a
sized loader Lightning fetches no batch ahead, so that count is exactly the batches trained on
when a checkpoint is written (after a step, or after a validation). The datamodule checkpoints
it and hands it back through ``load_state_dict()`` when it builds the resumed run's loader (see
``VQADataModule.state_dict``); the sampler then starts past those batches, so the resumed
epoch trains on the batches the interrupted one had not reached, each once. Having the two
methods also tells Lightning the loader is resumable.

Loader workers ignore SIGTERM and SIGUSR1: a cluster sends them to every process of a job, and
a worker killed by one makes the main process fail at its next batch, before it can write the
preemption checkpoint (vqa.callbacks.PreemptionCheckpoint). The main process ends them.

Worker seeds come from the loader's own generator, reseeded from (seed, epoch) at every pass:
creating an iterator otherwise draws a base seed from the global torch RNG, which is the
stream modality dropout and ``nn.Dropout`` use, and a resumed run creates its iterators at
other moments than the run it continues (the sanity check, the first epoch).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

# Distinct from the samplers' seed * 1_000_003 + epoch: worker seeds must not equal the order.
_WORKER_SEED_STRIDE = 7_919
# What a cluster sends before it kills or requeues a job; PreemptionCheckpoint handles them.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def init_worker(worker_id: int) -> None:
    """Seed as Lightning would (``seed_everything(workers=True)`` sets PL_SEED_WORKERS; a
    loader with its own worker_init_fn does not get Lightning's), then leave preemption
    signals to the main process."""
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with a (seed, epoch)-seeded generator and a mid-epoch resume point.

    The sampler (an image-grouped one, which has ``epoch`` and ``start``) decides the order;
    this loader tells it where to start and counts the batches it hands out.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        kwargs.setdefault("worker_init_fn", init_worker)
        super().__init__(*args, **kwargs)
        self.seed = seed
        self._pass_epoch = 0
        self._batches_out = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained on)

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing below runs until the first batch is asked for, i.e. after
        # Lightning's set_epoch for the coming epoch (it builds the iterator before that).
        epoch = self._epoch()
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        if hasattr(self.sampler, "start"):
            self.sampler.start = skip * self.batch_size
        elif skip:
            raise RuntimeError(f"{type(self.sampler).__name__} cannot start mid-epoch")
        self.generator.manual_seed(self.seed * _WORKER_SEED_STRIDE + epoch)
        self._pass_epoch, self._batches_out = epoch, skip
        for batch in super().__iter__():
            self._batches_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._pass_epoch, "batches": self._batches_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self._resume[0])
