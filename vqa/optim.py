"""The optimisation recipe, built in one place: parameter groups with their LR multipliers, the
optimizer, and the per-step LR schedule.

The optimizer and the schedule come from the `optimizer` and `scheduler` config groups as
``_partial_`` callables: ``optimizer(params=groups)`` and ``scheduler(optimizer, total_steps)``.
:func:`build_optimization` turns them into what ``LightningModule.configure_optimizers``
returns; `VQALitModule` and the benchmark's bare PyTorch loop (`scripts/bench`) both call it,
so the two always step with the same LRs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

OptimizerFactory = Callable[..., Optimizer]
# scheduler(optimizer, total_steps): the schedule over the run's optimizer steps
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]

NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)


# ----------------------------------------------------------------------------- parameter groups
def parameter_groups(
    net: nn.Module, lr_scales: Mapping[str, float], rest: str = "fusion_head"
) -> list[dict[str, Any]]:
    """The trainable parameters of ``net`` in optimizer groups: one per submodule named in
    ``lr_scales`` (an attribute of ``net``, e.g. ``visual``), one named ``rest`` (scale 1) for
    all others, each split in two: no weight decay on norms, biases, embeddings and other
    vectors (learned nulls, scales), whose decay only hurts.

    Groups are named after their owner (``_no_decay`` appended), in sorted order, and marked
    ``lr_scale``, which :func:`build_optimization` multiplies into the optimizer's LR.
    """
    scales = {**lr_scales, rest: 1.0}
    owner = {id(p): name for name in lr_scales for p in getattr(net, name).parameters()}
    no_decay = {
        id(p)
        for m in net.modules()
        for name, p in m.named_parameters(recurse=False)
        if isinstance(m, NO_DECAY_MODULES) or name.endswith("bias") or p.ndim <= 1
    }
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p in net.parameters():
        if p.requires_grad:
            key = (owner.get(id(p), rest), id(p) in no_decay)
            groups.setdefault(key, []).append(p)
    result = []
    for (name, skip_decay), params in sorted(groups.items()):
        group: dict[str, Any] = {
            "params": params,
            "name": name + ("_no_decay" if skip_decay else ""),
            "lr_scale": scales[name],
        }
        if skip_decay:
            group["weight_decay"] = 0.0
        result.append(group)
    return result


# ----------------------------------------------------------------------------- LR schedules
def check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must lie in [0, 1], got {value}")


def warmup_steps(warmup_fraction: float, total_steps: int) -> int:
    """The warm-up's length in optimizer steps (rounded down)."""
    check_fraction("scheduler.warmup_fraction", warmup_fraction)
    return int(warmup_fraction * total_steps)


def cosine_warmup(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_fraction`` of the ``total_steps`` optimizer steps, then
    a cosine from each group's LR down to ``min_lr_ratio`` times it at the last step
    (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``)."""
    check_fraction("scheduler.min_lr_ratio", min_lr_ratio)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=warmup_steps(warmup_fraction, total_steps),
        num_training_steps=total_steps,
        min_lr_rate=min_lr_ratio,
    )


def constant(optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.0) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_fraction`` of the ``total_steps`` optimizer steps (none
    at 0), then each group's LR unchanged (transformers' ``get_constant_schedule_with_warmup``)."""
    return get_constant_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps(warmup_fraction, total_steps)
    )


def check_scheduler(scheduler: SchedulerFactory | None) -> None:
    """Build ``scheduler`` once on a stand-in optimizer, so that a wrong argument (a fraction out
    of [0, 1], a misspelt key) fails when the module is made, not after the data set-up when
    the fit configures its optimizer."""
    if scheduler is not None:
        scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 100)


# ----------------------------------------------------------------------------- both together
def build_optimization(
    param_groups: list[dict[str, Any]],
    optimizer: OptimizerFactory,
    scheduler: SchedulerFactory | None,
    total_steps: float,
) -> dict[str, Any]:
    """The optimizer over ``param_groups`` (each group's LR scaled by its ``lr_scale``) and the
    schedule over ``total_steps`` optimizer steps, as ``configure_optimizers`` returns them.

    ``total_steps`` counts optimizer steps over the whole run (``trainer.estimated_stepping_
    batches``: accumulation and limit_train_batches included); it is the same on resume, so a
    restored scheduler continues on the same curve. ``scheduler=None``: the optimizer's LRs
    throughout.
    """
    built = optimizer(params=param_groups)
    # The optimizer filled in its configured LR; scale it before the scheduler records it as
    # each group's peak (initial_lr).
    for group in built.param_groups:
        group["lr"] *= group.get("lr_scale", 1.0)
    if scheduler is None:
        return {"optimizer": built}
    if not math.isfinite(total_steps):
        raise ValueError(
            "the LR schedule is laid out over the run's optimizer steps and needs a finite run: "
            "set trainer.max_epochs or trainer.max_steps"
        )
    schedule = scheduler(built, max(1, int(total_steps)))
    # interval=step: Lightning steps it once per optimizer step, i.e. after the last of
    # accumulate_grad_batches micro-batches, never per micro-batch.
    return {"optimizer": built, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
