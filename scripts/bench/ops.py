"""Section 6, ``ops``: the aten ops and host syncs of one training step, bare loop and Lightning."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
from omegaconf import open_dict
from torch import Tensor

from scripts.bench.common import (
    BareLoop,
    Context,
    collect_batches,
    compose_config,
    lightning_fit,
    log,
    to_device,
)
from vqa.cli.train import build_components
from vqa.data.batch import VQABatch
from vqa.utils.op_counter import StepOps, count_ops

# ------------------------------------------------------------------------------- section 6


# Fused AdamW: the other implementations keep each parameter's step count on the CPU and read it
# with .item() every step, host reads that make no GPU wait but would fill the sync column.
OPS_OVERRIDES = ["data.num_workers=0", "optimizer.fused=true"]
OPS_NOTE = (
    "aten ops = every op the dispatcher ran (views included), a proxy for the kernels a GPU "
    "launches; host syncs = ops whose result the host must wait for (.item(), bool(t), nonzero "
    "and boolean indexing, copies to the CPU) plus Python calls of Tensor.item/tolist/cpu/numpy "
    "(vqa.utils.op_counter; one .item() on a CPU tensor counts as both). Phases: forward = "
    "modality dropout, model and loss (Lightning: training_step, with its metrics and logging); "
    "backward; optimizer = clipping, AdamW step, LR schedule (Lightning: everything until the next "
    "batch starts). The counted step is the second one: the first creates the optimizer state"
)


def count_phases(phases: Iterable[tuple[str, Callable[[], Any]]]) -> dict[str, StepOps]:
    """Run each phase under its own op counter, in order."""
    counted: dict[str, StepOps] = {}
    for name, fn in phases:
        with count_ops() as ops:
            fn()
        counted[name] = ops
    return counted


def count_bare_step(loop: BareLoop, batch: VQABatch) -> dict[str, StepOps]:
    loss: list[Tensor] = []
    return count_phases(
        [
            ("forward", lambda: loss.append(loop.forward(batch))),
            ("backward", lambda: loop.backward(loss[0])),
            ("optimizer", loop.optimizer_step),
        ]
    )


def merge_ops(records: Iterable[tuple[str, StepOps]]) -> dict[str, StepOps]:
    merged: dict[str, StepOps] = {}
    for phase, ops in records:
        into = merged.setdefault(phase, StepOps())
        into.ops.update(ops.ops)
        into.syncs.update(ops.syncs)
        into.host_reads.update(ops.host_reads)
    return merged


def ops_summary(phases: dict[str, StepOps], steps: int = 1, top: int = 10) -> dict[str, Any]:
    """Per-step counts (``steps`` counted steps averaged), by phase, with the ``top`` ops."""
    total = merge_ops(("total", ops) for ops in phases.values()).get("total", StepOps())
    return {
        "steps_counted": steps,
        "kernels": total.kernels / steps,
        "phases": {name: ops.kernels / steps for name, ops in phases.items()},
        "host_syncs": total.host_syncs / steps,
        "phase_host_syncs": {name: ops.host_syncs / steps for name, ops in phases.items()},
        "syncs": {name: n / steps for name, n in total.syncs.most_common()},
        "host_reads": {name: n / steps for name, n in total.host_reads.most_common()},
        "top_ops": [[name, n / steps] for name, n in total.ops.most_common(top)],
    }


class OpsWindow(pl.Callback):
    """Counts the ops of training steps ``first`` .. ``first + steps - 1`` of a fit, each from its
    ``on_train_batch_start`` to the next one, split at the backward hooks into forward, backward
    and optimizer phases."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps = first, steps
        self.records: list[tuple[str, StepOps]] = []
        self._started = 0
        self._open: contextlib.ExitStack | None = None

    def _switch(self, phase: str | None) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None
        if phase is not None:
            self._open = contextlib.ExitStack()
            self.records.append((phase, self._open.enter_context(count_ops())))

    def on_train_batch_start(self, *args: Any) -> None:
        index, self._started = self._started, self._started + 1
        self._switch("forward" if self.first <= index < self.first + self.steps else None)

    def on_before_backward(self, *args: Any) -> None:
        if self._open is not None:
            self._switch("backward")

    def on_after_backward(self, *args: Any) -> None:
        if self._open is not None:
            self._switch("optimizer")

    def on_train_end(self, *args: Any) -> None:
        self._switch(None)

    def on_exception(self, *args: Any) -> None:
        self._switch(None)

    @property
    def phases(self) -> dict[str, StepOps]:
        return merge_ops(self.records)


def section_ops(ctx: Context) -> dict[str, Any]:
    """Per fusion block: one bare step and one Lightning step (no callbacks or logger); for the
    quick-start's own block also Lightning with the user's callbacks and logger, averaged over
    ``log_every_n_steps`` steps (one logging step among them)."""
    sizes, device = ctx.sizes, ctx.device
    first = sizes.ops_first
    rows = []
    cfg = None
    for fusion in ctx.fusions:
        workdir = ctx.workdir / "ops" / fusion
        cfg = compose_config([*sizes.base_overrides, f"fusion={fusion}", *OPS_OVERRIDES], workdir)
        if device.type == "cuda":
            with open_dict(cfg):
                cfg.trainer.accelerator, cfg.trainer.devices = "gpu", 1
        pl.seed_everything(cfg.seed, verbose=False)
        datamodule, module = build_components(cfg)
        with_user = fusion == ctx.default_fusion
        window = int(cfg.trainer.log_every_n_steps) if with_user else 1
        batches = collect_batches(datamodule, first + window + 1)
        initial = copy.deepcopy(module.state_dict())

        module.to(device).train()
        loop = BareLoop(
            module, first + 2, cfg.trainer.gradient_clip_val, cfg.trainer.precision, device
        )
        on_device = [to_device(b, device) for b in batches[: first + 1]]
        for batch in on_device[:first]:
            loop.step(batch)
        rows.append(
            {
                "fusion": fusion,
                "loop": "bare",
                **ops_summary(count_bare_step(loop, on_device[first])),
            }
        )
        del loop, on_device
        for user_callbacks in (False, True) if with_user else (False,):
            steps = window if user_callbacks else 1
            module.load_state_dict(initial)
            counter = OpsWindow(first, steps)
            lightning_fit(
                cfg,
                module,
                batches[: first + steps + 1],
                workdir / f"fit-{'user' if user_callbacks else 'bare'}",
                user_callbacks=user_callbacks,
                extra_callbacks=[counter],
            )
            loop_name = "lightning + callbacks, logger" if user_callbacks else "lightning"
            rows.append({"fusion": fusion, "loop": loop_name, **ops_summary(counter.phases, steps)})
        log.info("ops: %s done", fusion)
    return {
        "config": " ".join([*sizes.base_overrides, "fusion=<name>", *OPS_OVERRIDES]),
        "device": str(device),
        "precision": None if cfg is None else str(cfg.trainer.precision),
        "callbacks": None
        if cfg is None
        else sorted(k for k, v in (cfg.get("callbacks") or {}).items() if v),
        "logger": None
        if cfg is None
        else sorted(k for k, v in (cfg.get("logger") or {}).items() if v),
        "note": OPS_NOTE,
        "rows": rows,
    }
