"""A training step never makes the host wait for the device.

Each case composes the training config as ``train.py`` does (tiny sizes, modality dropout on),
builds the data module and the module with ``vqa.cli.train.build_components``, and fits one batch
with a Trainer built from the run's trainer config (gradient clipping at 5.0). The operations
are counted (``vqa.utils.op_counter``) from ``on_train_batch_start`` to ``on_train_batch_end``
of that batch, i.e. everything Lightning runs for it in between: the module's
``training_step`` (modality dropout, model, loss, train metrics, ``self.log``), Lightning's
closure and backward, gradient clipping (``clip_grad_norm_``, its foreach norm on every
device) and the AdamW step.

Not covered, because it is the Trainer's and not the step's: fetching and moving the batch,
and what runs after ``on_train_batch_end``: the logger connector reading the logged values on
the host every ``log_every_n_steps``, the progress bars reading ``prog_bar`` values (the rich
bar on every batch), and, under DDP only, Lightning's per-batch broadcast of its SIGTERM flag
followed by ``.item()``.

The counter sees ops, not devices: a host read here is a host read on a GPU too, so a CPU run
shows what would stall one. One exception is told apart: torch's foreach AdamW reads each
parameter's step count with ``.item()``, but those counts live on the CPU on every device
(unless the optimizer is capturable or fused), so they never wait for a GPU.
"""

from __future__ import annotations

import importlib
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import Tensor

from tests.helpers import ROOT, TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config, fit_steps
from vqa.cli.train import build_components
from vqa.utils import instantiate_callbacks, instantiate_loggers
from vqa.utils.op_counter import StepOps, count_ops

FUSIONS = sorted(p.stem for p in (ROOT / "configs" / "fusion").glob("*.yaml"))
# The default modality dropout, spelled out: the masks must stay on the device.
DROPOUT = ["module.image_dropout=0.1", "module.question_dropout=0.1"]
# VQA_TEST_DEVICE=cuda (scripts/gpu_check.sh on a lent GPU): the same steps on the GPU, where
# the counter also sees copies from the device to the host.
DEVICE = ["trainer.accelerator=gpu"] if os.environ.get("VQA_TEST_DEVICE") == "cuda" else []
FOREACH = "+optimizer.foreach=true"
FUSED = "optimizer.fused=true"


class CountOneBatch(pl.Callback):
    """Counts the ops of the first training batch, from its start hook to its end hook."""

    def __init__(self) -> None:
        self.counted: StepOps | None = None
        self._window = ExitStack()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.counted is None:
            self.counted = self._window.enter_context(count_ops())

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._window.close()

    def on_exception(self, trainer: pl.Trainer, *args: Any) -> None:
        self._window.close()


class StepCounterReads:
    """How often torch's AdamW reads a parameter's step count on the host (``_get_value``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        adam = importlib.import_module("torch.optim.adam")  # `torch.optim.adam` is not it
        original = adam._get_value

        def counted(x: Any) -> Any:
            if isinstance(x, Tensor):
                assert x.device.type == "cpu" and x.ndim == 0, "a step count off the host"
                self.reads += 1
            return original(x)

        monkeypatch.setattr(adam, "_get_value", counted)


def count_one_training_batch(
    tmp_path: Path,
    data_dir: Path,
    overrides: Sequence[str],
    patch_module: Callable[[pl.LightningModule], None] | None = None,
) -> StepOps:
    """One batch of a fit, as users run it, counted by :class:`CountOneBatch`."""
    cfg = compose_config(
        "train", [*TINY_OVERRIDES, *TINY_DATA_OVERRIDES, *overrides, *DEVICE], tmp_path, data_dir
    )
    GlobalHydra.instance().clear()
    counter = CountOneBatch()

    class Patch(pl.Callback):
        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            if patch_module is not None:
                patch_module(pl_module)

    fit_steps(cfg, [Patch(), counter], max_steps=1)
    assert counter.counted is not None, "the training batch never started"
    return counter.counted


def syncs_besides(counted: StepOps, step_counter_reads: int) -> Counter[str]:
    """Every sync and host read of ``counted`` except the optimizer's step-count reads, each
    of which is one ``Tensor.item`` and one ``aten._local_scalar_dense``."""
    rest = Counter(counted.syncs) + Counter(counted.host_reads)
    for name in ("Tensor.item", "aten._local_scalar_dense"):
        assert rest[name] >= step_counter_reads, (name, rest)
        rest[name] -= step_counter_reads
    return +rest


def describe(counted: StepOps, rest: Counter[str]) -> str:
    return (
        f"host synchronisations in the training step: {dict(rest)} "
        f"(all syncs {dict(counted.syncs)}, host reads {dict(counted.host_reads)})"
    )


CASES = [
    *[pytest.param([f"fusion={f}", FOREACH], id=f"{f}-foreach") for f in FUSIONS],
    pytest.param(["fusion=parallel", FUSED], id="parallel-fused"),
    pytest.param(["fusion=parallel", "module.loss=ce", FOREACH], id="parallel-ce-foreach"),
    # The GPU preset's combination: fused AdamW, clipping and bf16 autocast (CPU autocast here).
    pytest.param(
        ["fusion=parallel", FUSED, "trainer.precision=bf16-mixed"], id="parallel-fused-bf16"
    ),
]


@pytest.mark.parametrize("overrides", CASES)
def test_training_step_has_no_host_sync(
    overrides: list[str],
    tmp_path: Path,
    shared_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    step_counts = StepCounterReads(monkeypatch)
    counted = count_one_training_batch(tmp_path, shared_data_dir, [*DROPOUT, *overrides])

    # The window held the whole step: forward, backward, the clipping norm, the AdamW update.
    assert counted.ops["aten.convolution"] > 0 and counted.ops["aten.convolution_backward"] > 0
    assert counted.ops["aten._foreach_norm"] > 0
    adamw = "aten._fused_adamw_" if FUSED in overrides else "aten._foreach_addcdiv_"
    assert counted.ops[adamw] > 0, sorted(counted.ops)
    if FUSED in overrides:
        assert step_counts.reads == 0
    rest = syncs_besides(counted, step_counts.reads)
    assert not rest, describe(counted, rest)


def test_modality_dropout_and_masks_ran_in_the_counted_step(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cases above count a step that draws modality dropout masks and uses them."""
    seen: list[dict[str, Any]] = []

    def spy(module: pl.LightningModule) -> None:
        module.net.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True
        )

    StepCounterReads(monkeypatch)
    count_one_training_batch(tmp_path, shared_data_dir, [*DROPOUT, FOREACH], spy)
    assert len(seen) == 1
    assert isinstance(seen[0]["drop_image"], Tensor)
    assert isinstance(seen[0]["drop_question"], Tensor)


class CountBetweenBatches(pl.Callback):
    """Counts everything from one training batch's start to the next one's: the step and what
    the Trainer, the callbacks and the logger do after it."""

    def __init__(self, first: int) -> None:
        self.first = first
        self.counted: StepOps | None = None
        self._window = ExitStack()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.first:
            self.counted = self._window.enter_context(count_ops())
        elif batch_idx == self.first + 1:
            self._window.close()

    def on_exception(self, trainer: pl.Trainer, *args: Any) -> None:
        self._window.close()


def test_a_whole_training_iteration_with_the_shipped_callbacks_has_no_host_sync(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    """The default callbacks (rich progress bar, checkpointing, preemption, LR monitor) and the
    CSV logger add no host read between two batches that the logger does not write: the step
    loss stays off the progress bar, whose values Lightning reads after every batch."""
    cfg = compose_config(
        "train",
        [
            *[o for o in TINY_OVERRIDES if not o.startswith("callbacks.")],
            *TINY_DATA_OVERRIDES,
            *DROPOUT,
            "optimizer.fused=true",
            "trainer.log_every_n_steps=50",
            "data.batch_size=4",
            "data.num_workers=2",  # as users run it; the collator then runs in the workers
            *DEVICE,
        ],
        tmp_path,
        shared_data_dir,
    )
    GlobalHydra.instance().clear()
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, module = build_components(cfg)
    callbacks = instantiate_callbacks(cfg.callbacks)
    assert any(isinstance(cb, pl.callbacks.RichProgressBar) for cb in callbacks)
    counter = CountBetweenBatches(first=2)  # past the first step's optimizer-state creation
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, counter],
        logger=instantiate_loggers(cfg.logger),
        max_steps=4,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    assert counter.counted is not None and counter.counted.ops["aten._fused_adamw_"] > 0
    assert counter.counted.host_syncs == 0, describe(counter.counted, counter.counted.syncs)


@pytest.fixture(autouse=True)
def _clear_hydra() -> Iterator[None]:
    yield
    GlobalHydra.instance().clear()
