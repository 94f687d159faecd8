"""Early fusion: combine the question with every grid cell, then pool (a baseline).

The pooled question vector is multiplied with (or added to) each projected grid cell and a
non-linearity is applied *before* pooling; otherwise the pool would commute with the fusion
and the cells' box embeddings would collapse to a constant. With ``spatial_constraint`` the
pool is weighted by the sigmoid(MLP(box)) cell weights (a learned spatial prior), and the
image attention map is exactly those pooling weights.
"""

from __future__ import annotations

import torch.nn.functional as F

from vqa.models.fusion.base import FusionOutput, GridWords, SingleStageFusion, masked_mean

OPS = ("mul", "sum")


class EarlyFusion(SingleStageFusion):
    """GELU(q ∘ cell) for every cell of the last stage, pooled over the grid."""

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        hidden_dim: int = 512,
        op: str = "mul",
        positional: bool = True,
        spatial_constraint: bool = False,
        grid_norm: str = "batch",
        grid_stride: int = 1,
    ) -> None:
        if op not in OPS:
            raise ValueError(f"op={op!r} must be one of {OPS}")
        super().__init__(
            visual_channels,
            text_dim,
            hidden_dim,
            positional=positional,
            spatial_constraint=spatial_constraint,
            grid_norm=grid_norm,
            grid_stride=grid_stride,
        )
        self.op = op

    def attend(self, x: GridWords) -> FusionOutput:
        cells, mask, constraint, height, width = x.cells, x.mask, x.constraint, x.height, x.width
        question = masked_mean(x.words, mask).unsqueeze(1)  # broadcast over cells
        joint = F.gelu(cells * question if self.op == "mul" else cells + question)  # [B, M, D]

        if constraint is None:
            weights = cells.new_full(cells.shape[:2], 1.0 / cells.shape[1])
        else:
            weights = (constraint / constraint.sum(dim=-1, keepdim=True)).expand(cells.shape[:2])
        features = (weights.unsqueeze(1) @ joint).squeeze(1)
        real = mask.to(features.dtype)
        attention = {
            "image": weights.unflatten(-1, (height, width)),
            "question": real / real.sum(dim=1, keepdim=True).clamp_min(1.0),
        }
        return FusionOutput(features=features, attention=attention)
