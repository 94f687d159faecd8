"""Multi-head co-attention: ``h`` independent affinity matrices computed as one batched op.

One head can only express one notion of "this word matches this cell"; several heads let a
question look for colour, shape and location at once (seed 000, "多头部扩展"). Per head::

    S_h   = (W_q q)_h (W_k v)_h^T / sqrt(d_h)                                 [N, M]
    P_h   = softmax over cells of S_h [+ log w]  (each real word's distribution over cells)
    R_h   = softmax over real words of S_h^T (each cell's distribution over words)
    a_q,h = mean over cells of R_h        (question attention, 0 on padding)
    a_v,h = a_q,h P_h                     (image attention: words weighted by a_q)

so each head's maps are exactly the weights of its pooled features; the plotted maps average
the heads. ``spatial_constraint`` adds the log of the cells' prior weights w to P_h's logits
(``add_log_prior``); R_h would not change, a per-cell shift being lost in its softmax.
The attended grid tokens and words of every head are concatenated, fused as [v, q, v * q]
and projected to ``hidden_dim``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vqa.models.fusion.base import (
    FusionBlock,
    FusionOutput,
    GridAndWords,
    add_log_prior,
    keep_top_k,
    masked_mean,
    masked_softmax,
)


class MultiheadCoAttention(FusionBlock):
    """Parallel co-attention with ``num_heads`` heads over the last visual stage."""

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        hidden_dim: int = 512,
        num_heads: int = 8,
        top_k: int | None = None,
        attention_dropout: float = 0.1,
        residual: bool = True,
        positional: bool = True,
        spatial_constraint: bool = False,
        grid_norm: str = "batch",
    ) -> None:
        super().__init__(visual_channels, text_dim)
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.top_k = top_k
        self.residual = residual
        self.out_dim = hidden_dim
        self.inputs = GridAndWords(
            self.visual_channels,
            self.text_dim,
            hidden_dim,
            positional,
            spatial_constraint,
            grid_norm,
        )
        # Affinity projections; the values are the (head-split) grid tokens and words themselves.
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(attention_dropout)
        self.out_proj = nn.Linear(3 * hidden_dim, hidden_dim)

    def _heads(self, x: Tensor) -> Tensor:
        """[B, L, h*d_h] -> [B, h, L, d_h]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        x = self.inputs(visual, text, text_mask)
        cells, words, mask, constraint = x.cells, x.words, x.mask, x.constraint  # [B,M|N,D]
        height, width = x.height, x.width

        affinity = self._heads(self.query(words)) @ self._heads(self.key(cells)).transpose(-1, -2)
        affinity = affinity / math.sqrt(self.head_dim)  # [B, h, N, M]

        cell_logits = add_log_prior(affinity, constraint)
        per_word = masked_softmax(cell_logits, keep_top_k(cell_logits, self.top_k))
        by_cell = affinity.transpose(-1, -2)  # [B, h, M, N]
        per_cell = masked_softmax(by_cell, keep_top_k(by_cell, self.top_k, mask[:, None, None, :]))
        question_att = per_cell.mean(dim=-2)  # [B, h, N]
        image_att = (question_att.unsqueeze(-2) @ per_word).squeeze(-2)  # [B, h, M]

        # Weighted sums per head, heads concatenated back to [B, D].
        attended_cells = (self.dropout(image_att).unsqueeze(-2) @ self._heads(cells)).flatten(1)
        attended_words = (self.dropout(question_att).unsqueeze(-2) @ self._heads(words)).flatten(1)
        if self.residual:
            attended_cells = attended_cells + cells.mean(dim=1)
            attended_words = attended_words + masked_mean(words, mask)
        # The product term lets the projection gate visual content by the question.
        features = self.out_proj(
            torch.cat([attended_cells, attended_words, attended_cells * attended_words], dim=-1)
        )
        attention = {
            "image": image_att.mean(dim=1).unflatten(-1, (height, width)),
            "question": question_att.mean(dim=1),
        }
        return FusionOutput(features=features, attention=attention)
