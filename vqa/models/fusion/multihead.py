"""Multi-head co-attention: ``h`` independent affinity matrices computed as one batched op.

One head can only express one notion of "this word matches this cell"; several heads, as in
the multi-head attention of Vaswani et al. (NeurIPS 2017), let a question look for colour,
shape and location at once. Per head::

    S_h   = (W_q q)_h (W_k v)_h^T / sqrt(d_h)                                 [N, M]
    P_h   = softmax over cells of S_h [+ log w]  (each real word's distribution over cells)
    R_h   = softmax over real words of S_h^T (each cell's distribution over words)
    a_q,h = mean over cells of R_h        (question attention, 0 on padding)
    a_v,h = a_q,h P_h                     (image attention: words weighted by a_q)

so each head's maps are exactly the weights of its pooled features; the plotted maps average
the heads. ``spatial_constraint`` adds the log of the cells' prior weights w to P_h's logits
(``add_log_prior``); R_h would not change, a per-cell shift being lost in its softmax.
The attended grid tokens and words of every head are concatenated, fused as [v, q, v * q]
and projected to ``hidden_dim``. The maths is ``attention.MultiheadAffinityAttention``.
"""

from __future__ import annotations

from typing import ClassVar

from vqa.models.fusion.attention import MultiheadAffinityAttention
from vqa.models.fusion.base import SingleStageFusion


class MultiheadCoAttention(SingleStageFusion):
    """Parallel co-attention with ``num_heads`` heads over the last visual stage."""

    # Before the attention maths had one home, its layers sat on the block itself.
    LEGACY_KEYS: ClassVar[dict[str, str]] = {"query.": "attention.query.", "key.": "attention.key."}

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
        grid_stride: int = 1,
        cell_conditioning: bool = False,
        count: bool = False,
        question_norm: str = "batch",
        cell_context: int = 0,
    ) -> None:
        super().__init__(
            visual_channels,
            text_dim,
            hidden_dim,
            lambda: MultiheadAffinityAttention(hidden_dim, num_heads),
            top_k=top_k,
            attention_dropout=attention_dropout,
            residual=residual,
            positional=positional,
            spatial_constraint=spatial_constraint,
            grid_norm=grid_norm,
            grid_stride=grid_stride,
            cell_conditioning=cell_conditioning,
            count=count,
            question_norm=question_norm,
            cell_context=cell_context,
        )
