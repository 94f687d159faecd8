"""Batch norms that survive a training batch with one value per channel.

The train loader keeps its last partial batch, so a rank whose sample count is one more than a
multiple of the batch size trains on a single sample, where ``nn.BatchNorm*`` raises ("Expected
more than 1 value per channel when training"). These subclasses normalise such a batch with
their running statistics, as in eval mode, and leave those statistics (and
``num_batches_tracked``) untouched: one value has no variance to learn from. Any larger batch
goes to the parent's ``forward`` unchanged, and the parameters and buffers are the parent's, so
outputs and state-dict keys equal ``nn.BatchNorm*`` exactly and old checkpoints load.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class _RunningStatsForSingleValue:
    """Mixin placed before an ``nn.BatchNorm*`` base in the bases list."""

    def forward(self, input: Tensor) -> Tensor:
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


class SafeBatchNorm1d(_RunningStatsForSingleValue, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that uses its running statistics on a one-sample training batch."""


class SafeBatchNorm2d(_RunningStatsForSingleValue, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that uses its running statistics when a training batch has a single
    value per channel (one sample of a 1x1 map)."""
