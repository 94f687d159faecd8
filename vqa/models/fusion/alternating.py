"""Alternating co-attention (Lu et al., NeurIPS 2016): question -> image -> question, repeated.

Lu et al.'s guided attention ``A(X; g)``::

    H = tanh(W_x X + W_g g),  a = softmax(w_hx^T H),  x_hat = sum_i a_i x_i

First the question is summarised with no guidance (g = 0), then each step attends the grid
guided by the current question vector and the words guided by the attended image vector, so
each attention is refined by the other modality's latest view. Every step has its own
weights. ``spatial_constraint`` adds the log of the sigmoid(MLP(box)) cell weights to every
image attention's logits (``add_log_prior``): softmax(l + log w) is proportional to
w * exp(l), a down-weighting whatever the logits' sign. The final image and question vectors
are fused as [v, q, v * q] and projected to ``hidden_dim``. The maths is
``attention.AlternatingAttention``.
"""

from __future__ import annotations

from typing import ClassVar

from vqa.models.fusion.attention import AlternatingAttention
from vqa.models.fusion.base import SingleStageFusion


class AlternatingCoAttention(SingleStageFusion):
    """``steps`` rounds of image attention guided by the question and vice versa."""

    # Before the attention maths had one home, its layers sat on the block itself.
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        f"{name}.": f"attention.{name}." for name in ("summary", "image_steps", "question_steps")
    }

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        hidden_dim: int = 512,
        steps: int = 2,
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
            lambda: AlternatingAttention(hidden_dim, steps, bias=True),
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
