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

Normalisation: ``norm="batch"`` (the default) uses running statistics in eval mode, so samples
are independent there, but in train mode BatchNorm couples the samples of a batch; use
``norm="group"`` for per-sample normalisation in training too (e.g. tiny per-device batches).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vqa.models.fusion.attention import affinity_attention, pool
from vqa.models.fusion.base import FusionBlock, FusionOutput, SpatialGrid, flatten_grid, joint
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
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.residual = residual
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

    def forward(
        self, feature_map: Tensor, text: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """[B, C, H, W], text [B, N, D_t] (0 on padding) -> stage output [B, 3D],
        image attention [B, M], question attention [B, N]."""
        keys, constraint = self.key_grid(self.key(feature_map))  # [B, M, D], [1, M] | None
        values = flatten_grid(self.value(feature_map))  # [B, M, D]
        queries = self.query(text)  # [B, N, D]

        image_att, question_att = affinity_attention(
            queries, keys, mask, self.top_k, constraint, scaling="multiply"
        )  # [B, M], [B, N]
        attended = pool(image_att, values, self.dropout)
        if self.residual:
            attended = attended + values.mean(dim=1)
        question = pool(question_att, queries, self.dropout)
        fused = joint(attended, question)
        return fused, image_att, question_att


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
    ) -> None:
        super().__init__(visual_channels, text_dim)
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
            )
            for channels in self.visual_channels
        )
        self.out_proj = nn.Linear(len(self.visual_channels) * 3 * hidden_dim, hidden_dim)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        if len(visual) != len(self.stages):
            raise ValueError(
                f"cot was built for {len(self.stages)} visual stages "
                f"(visual_channels={self.visual_channels}) but got {len(visual)} feature maps"
            )
        mask = text_mask.bool()
        text = text.masked_fill(~mask.unsqueeze(-1), 0.0)
        outputs: list[Tensor] = []
        attention: dict[str, Tensor] = {}
        for index, (stage, feature_map) in enumerate(zip(self.stages, visual, strict=True)):
            output, image_att, question_att = stage(feature_map, text, mask)
            outputs.append(output)
            attention[f"image/stage{index}"] = image_att.unflatten(-1, feature_map.shape[-2:])
            attention[f"question/stage{index}"] = question_att
        return FusionOutput(features=self.out_proj(torch.cat(outputs, dim=-1)), attention=attention)
