"""Batch norms that survive a training batch with one value per channel, and that can ignore
padding rows.

The train loader keeps its last partial batch, so a rank whose sample count is one more than a
multiple of the batch size trains on a single sample, where ``nn.BatchNorm*`` raises ("Expected
more than 1 value per channel when training"). These subclasses normalise such a batch with
their running statistics, as in eval mode, and leave those statistics (and
``num_batches_tracked``) untouched: one value has no variance to learn from. Any larger batch
goes to the parent's ``forward`` unchanged, and the parameters and buffers are the parent's, so
outputs and state-dict keys equal ``nn.BatchNorm*`` exactly and old checkpoints load.

Static-shape batches (``data.static_shapes``) carry padding rows, copies of real ones, so that
every batch has the same shapes. Inside :func:`padding_rows` a norm that uses batch statistics
takes them over the valid rows only (weighted sums, so the shapes stay static and nothing waits
on the host), normalises every row with them and moves its running statistics as
``nn.BatchNorm*`` would on the valid rows alone: a padded batch then gives the unpadded batch's
outputs, gradients and running statistics. ``VQAModel`` opens it per phase (the image rows of
the visual encoder and ``prepare_visual``, the question rows of the text encoder and ``fuse``),
so a norm never has to know which kind of row it sees.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _PaddingRows(threading.local):
    """The valid-row mask of the running phase, per thread: a backward recomputation (gradient
    checkpointing) can run on an autograd thread, which must not see another thread's mask.

    A plain attribute rather than a ``ContextVar``: ``torch.compile`` cannot trace
    ``ContextVar.set`` (a graph break at every norm), and reads and writes this one.
    """

    def __init__(self) -> None:
        self.valid: Tensor | None = None


_ROWS = _PaddingRows()


@contextmanager
def padding_rows(valid: Tensor | None) -> Iterator[None]:
    """Batch norms inside take their batch statistics over the rows where ``valid`` [R] (bool)
    is True; ``None``: over every row, exactly as ``nn.BatchNorm*``. A float ``valid`` weighs
    each row by its value, as if the row were repeated that many times (``VQAModel`` weighs an
    image row by the questions that read it).

    Every norm inside that uses batch statistics must see R rows: a module that reshapes rows
    (heads into the batch, say) would otherwise get the mask of other rows, so that raises.
    """
    previous = _ROWS.valid
    _ROWS.valid = valid
    try:
        yield
    finally:
        _ROWS.valid = previous


def active_padding_rows() -> Tensor | None:
    """The mask :func:`padding_rows` set on this thread (None outside one)."""
    return _ROWS.valid


def checkpoint_contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    The recomputation runs in backward, after the forward's :func:`padding_rows` has closed (and
    maybe on another thread); without the forward's mask it would recompute other statistics
    than the forward used, and the gradients would be wrong.
    """
    return nullcontext(), padding_rows(_ROWS.valid)


class _RunningStatsForSingleValue:
    """Mixin placed before an ``nn.BatchNorm*`` base in the bases list."""

    def forward(self, input: Tensor) -> Tensor:
        valid = _ROWS.valid
        # The parent's rule for batch statistics: training, or no running statistics to use.
        if valid is not None and (self.training or self.running_mean is None):
            self._check_input_dim(input)
            return _masked_batch_norm(self, input, valid)
        if self.training and self.track_running_stats and values_per_channel(input) == 1:
            self._check_input_dim(input)
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=False,
                momentum=0.0,
                eps=self.eps,
            )
        # Without running statistics there is nothing to fall back on: the parent's error stands.
        return super().forward(input)


def values_per_channel(input: Tensor) -> int:
    """What BatchNorm averages over per channel: the batch times any spatial dimensions."""
    return input.shape[0] * math.prod(input.shape[2:])


def _masked_batch_norm(
    norm: nn.modules.batchnorm._BatchNorm, input: Tensor, valid: Tensor
) -> Tensor:
    """Batch norm with statistics over the rows where ``valid`` is True.

    One valid value per channel falls back to the running statistics, as the unpadded batch
    would (``torch.where``, not a branch: the count is a device value).
    """
    if valid.shape != input.shape[:1]:
        raise ValueError(
            f"{type(norm).__name__} got {input.shape[0]} rows under a padding mask of "
            f"{valid.shape[0]} rows: batch norms must run on the rows the mask describes "
            "(images in the visual encoder and prepare_visual, questions in fuse)"
        )
    # Reduced precision would sum thousands of values per channel badly; the parent's kernels
    # accumulate in float32 too.
    dtype = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x = input.to(dtype)
    dims = [0, *range(2, x.dim())]
    channel_shape = (1, -1, *([1] * (x.dim() - 2)))
    weights = valid.to(dtype).view(-1, *([1] * (x.dim() - 1)))
    count = valid.sum() * math.prod(x.shape[2:])
    n = count.to(dtype)
    mean = (x * weights).sum(dims) / n.clamp_min(1.0)
    var = ((x - mean.view(channel_shape)).square() * weights).sum(dims) / n.clamp_min(1.0)

    update = norm.training and norm.track_running_stats
    if norm.running_mean is not None and norm.running_var is not None:
        enough = count > 1
        if update:
            _update_running_stats(norm, mean.detach(), var.detach(), n, enough)
        # Eval-mode statistics when one value has no variance (the unpadded batch's fallback);
        # the clamps above keep the unused branch finite, so its zero gradient stays zero.
        if norm.training:
            mean = torch.where(enough, mean, norm.running_mean.to(dtype))
            var = torch.where(enough, var, norm.running_var.to(dtype))
    scale = torch.rsqrt(var + norm.eps)
    out = (x - mean.view(channel_shape)) * scale.view(channel_shape)
    if norm.weight is not None:
        out = out * norm.weight.to(dtype).view(channel_shape)
    if norm.bias is not None:
        out = out + norm.bias.to(dtype).view(channel_shape)
    return out.to(input.dtype)


def _update_running_stats(
    norm: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, n: Tensor, enough: Tensor
) -> None:
    """``nn.BatchNorm*``'s update from the valid values, skipped (as a zero factor, and no
    count) when there is only one."""
    with torch.no_grad():
        norm.num_batches_tracked.add_(enough.to(norm.num_batches_tracked.dtype))
        if norm.momentum is None:  # cumulative average, as the parent
            factor = 1.0 / norm.num_batches_tracked.clamp_min(1).to(mean.dtype)
        else:
            factor = torch.full((), norm.momentum, dtype=mean.dtype, device=mean.device)
        factor = torch.where(enough, factor, torch.zeros_like(factor))
        unbiased = var * n / (n.clamp_min(2.0) - 1.0)
        for running, batch in ((norm.running_mean, mean), (norm.running_var, unbiased)):
            f = factor.to(running.dtype)
            running.mul_(1.0 - f).add_(f * batch.to(running.dtype))


class SafeBatchNorm1d(_RunningStatsForSingleValue, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that uses its running statistics on a one-sample training batch, and
    ignores padding rows inside :func:`padding_rows`."""


class SafeBatchNorm2d(_RunningStatsForSingleValue, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that uses its running statistics when a training batch has a single
    value per channel (one sample of a 1x1 map), and ignores padding rows inside
    :func:`padding_rows`."""
