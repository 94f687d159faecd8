"""Multi-scale CoT attention: the question attends over every ResNet stage.

The keys follow the Contextual Transformer block of Li, Yao, Pan and Mei ("Contextual
Transformer Networks for Visual Recognition", TPAMI 2022): per stage they come from a grouped
3x3 convolution (each key sees its neighbourhood, so "next to" and object extent are in the
key) + norm + ReLU, the values from a 1x1 convolution + norm. Keys get the cells' box
embedding (and optionally the spatial-constraint weights) through ``SpatialGrid``. The words
are the queries, and ``attention.affinity_attention`` (the single-head case of multihead's
attention) gives, with scaled affinity ``S = q k^T / sqrt(d)`` [N, M]:

* every real word's distribution over cells is softmax(S) (top-k sparse if asked), or
  softmax(S + log w) with the spatial constraint's cell weights w (``add_log_prior``);
* question attention = mean over cells of each cell's distribution over the real words;
* image attention = those word distributions weighted by the question attention.

The attended value v (plus the stage's mean value as residual, added to the pooled vector)
and the attended question q give the stage output [v, q, v * q]; the outputs of all stages are
concatenated and projected to ``hidden_dim``.

Keys and values depend on the image alone, so they are computed once per distinct image
(``prepare_visual``) however many questions ask about it; only the queries, the affinity and
the pooling are per question. Options (off by default, the same as the single-stage blocks'):

* ``grid_stride`` s > 1: each stage is first read in s x s patches by a trained convolution
  (+ norm + ReLU, ``hidden_dim`` wide), and the keys and values are that patch grid's, so a fine
  cached map (the quick-start's 32x32 layer1) gives a grid, and an attention, s^2 times smaller;
* ``cell_conditioning``: the values, with the keys' box embedding added, pass through
  ``ConditionedCells`` (the question, as the mean of its projected words, asks every cell
  first) before the attention pools them; the keys stay the contextual convolution's;
* ``count``: each stage's conditioned values, summed and scaled, are appended to the output, an
  unnormalised read-out that keeps counts (softmax pooling cannot); needs ``cell_conditioning``.

Normalisation: ``norm="batch"`` (the default) uses running statistics in eval mode, so samples
are independent there, but in train mode BatchNorm couples the samples of a batch; use
``norm="group"`` for per-sample normalisation in training too (e.g. tiny per-device batches).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vqa.models.fusion.attention import affinity_attention, pool
from vqa.models.fusion.base import (
    ConditionedCells,
    FusionBlock,
    FusionOutput,
    SpatialGrid,
    grid_boxes,
    joint,
    summed,
)
from vqa.models.norms import SafeBatchNorm2d

NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return SafeBatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class CoTStage(nn.Module):
    """CoT co-attention between the question and one visual stage."""

    def __init__(
        self,
        channels: int,
        text_dim: int,
        dim: int,
        groups: int,
        norm: str,
        top_k: int | None,
        attention_dropout: float,
        residual: bool,
        positional: bool,
        spatial_constraint: bool,
        stride: int = 1,
        cell_conditioning: bool = False,
    ) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"grid_stride={stride} must be >= 1")
        self.top_k = top_k
        self.residual = residual
        # stride s: the map is first read in s x s patches by a trained conv (as SpatialGrid
        # reads it for the single-stage blocks); keys and values are then the patch grid's.
        self.patch = (
            None
            if stride == 1
            else nn.Sequential(
                nn.Conv2d(channels, dim, stride, stride=stride),
                _norm(norm, dim),
                nn.ReLU(inplace=True),
            )
        )
        channels = channels if self.patch is None else dim
        self.key = nn.Sequential(
            nn.Conv2d(channels, dim, 3, padding=1, groups=groups, bias=False),
            _norm(norm, dim),
            nn.ReLU(inplace=True),
        )
        self.value = nn.Sequential(nn.Conv2d(channels, dim, 1, bias=False), _norm(norm, dim))
        # Key head on top of the conv: mixes the groups and adds where each cell is.
        self.key_grid = SpatialGrid(dim, dim, positional, spatial_constraint)
        self.query = nn.Linear(text_dim, dim)
        self.dropout = nn.Dropout(attention_dropout)
        # Created last: without it the stage draws its initial weights as before the option.
        self.conditioning = ConditionedCells(dim, dim, dim) if cell_conditioning else None

    def prepare(self, feature_map: Tensor) -> list[Tensor]:
        """Per distinct image, [U, C, H, W] -> keys and values as grids [U, H', W', D] and,
        with ``cell_conditioning``, the values' share of its first layer."""
        if self.patch is not None:
            feature_map = self.patch(feature_map)
        keys = self.key_grid.cells(self.key(feature_map))
        values = self.value(feature_map).permute(0, 2, 3, 1)
        if self.conditioning is None:
            return [keys, values]
        # Conditioned values are summed (count) as well as attended: like the single-stage
        # blocks' cells they carry where they are (the keys' box embedding), or the sum could
        # not answer "the shape left of X".
        if self.key_grid.position is not None:
            height, width = values.shape[1:3]
            boxes = grid_boxes(height, width, device=values.device, dtype=values.dtype)
            values = values + self.key_grid.position(boxes).view(height, width, -1)
        return [keys, values, self.conditioning.cell_term(values)]

    def forward(
        self, prepared: list[Tensor], text: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``prepare``'s output (one row per question), text [B, N, D_t] (0 on padding) ->
        stage output [B, 3D], the values [B, M, D] (conditioned, with ``cell_conditioning``),
        image attention [B, M], question attention [B, N]."""
        keys, values = prepared[0].flatten(1, 2), prepared[1].flatten(1, 2)  # [B, M, D]
        constraint = self.key_grid.prior(*prepared[0].shape[1:3], keys)  # [1, M] | None
        queries = self.query(text)  # [B, N, D]
        if self.conditioning is not None:
            question = self.conditioning.pooled_question(queries, mask)
            values = self.conditioning(values, prepared[2].flatten(1, 2), question)

        image_att, question_att = affinity_attention(
            queries, keys, mask, self.top_k, constraint, scaling="multiply"
        )  # [B, M], [B, N]
        attended = pool(image_att, values, self.dropout)
        if self.residual:
            attended = attended + values.mean(dim=1)
        question = pool(question_att, queries, self.dropout)
        fused = joint(attended, question)
        return fused, values, image_att, question_att


class CoTAttention(FusionBlock):
    """CoT attention over every configured visual stage; stage outputs concatenated + projected."""

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        hidden_dim: int = 512,
        groups: int = 4,
        norm: str = "batch",
        top_k: int | None = None,
        attention_dropout: float = 0.1,
        residual: bool = True,
        positional: bool = True,
        spatial_constraint: bool = False,
        grid_stride: int = 1,
        cell_conditioning: bool = False,
        count: bool = False,
    ) -> None:
        super().__init__(visual_channels, text_dim)
        if count and not cell_conditioning:
            raise ValueError(
                "count reads the question-conditioned values: it needs cell_conditioning=true"
            )
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        for channels in (*self.visual_channels, hidden_dim):
            if channels % groups:
                raise ValueError(
                    f"groups={groups} must divide every stage's channels and hidden_dim, "
                    f"got channels {self.visual_channels} and hidden_dim={hidden_dim}"
                )
        self.out_dim = hidden_dim
        self.stages = nn.ModuleList(
            CoTStage(
                channels,
                self.text_dim,
                hidden_dim,
                groups=groups,
                norm=norm,
                top_k=top_k,
                attention_dropout=attention_dropout,
                residual=residual,
                positional=positional,
                spatial_constraint=spatial_constraint,
                stride=grid_stride,
                cell_conditioning=cell_conditioning,
            )
            for channels in self.visual_channels
        )
        self.out_proj = nn.Linear(len(self.visual_channels) * 3 * hidden_dim, hidden_dim)
        self.count = count
        if count:
            self.out_dim += len(self.visual_channels) * hidden_dim

    def prepare_visual(self, visual: list[Tensor]) -> list[Tensor]:
        """Per distinct image: every stage's ``CoTStage.prepare`` output, stage after stage."""
        if len(visual) != len(self.stages):
            raise ValueError(
                f"cot was built for {len(self.stages)} visual stages "
                f"(visual_channels={self.visual_channels}) but got {len(visual)} feature maps"
            )
        return [
            part
            for stage, feature_map in zip(self.stages, visual, strict=True)
            for part in stage.prepare(feature_map)
        ]

    def fuse(self, prepared: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        mask = text_mask.bool()
        text = text.masked_fill(~mask.unsqueeze(-1), 0.0)
        per_stage = len(prepared) // len(self.stages)
        outputs: list[Tensor] = []
        counts: list[Tensor] = []
        attention: dict[str, Tensor] = {}
        for index, stage in enumerate(self.stages):
            parts = prepared[index * per_stage : (index + 1) * per_stage]
            output, values, image_att, question_att = stage(parts, text, mask)
            outputs.append(output)
            if self.count:
                counts.append(summed(values))
            attention[f"image/stage{index}"] = image_att.unflatten(-1, parts[0].shape[1:3])
            attention[f"question/stage{index}"] = question_att
        features = self.out_proj(torch.cat(outputs, dim=-1))
        return FusionOutput(features=torch.cat([features, *counts], dim=-1), attention=attention)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        return self.fuse(self.prepare_visual(visual), text, text_mask)
