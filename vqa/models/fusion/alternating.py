"""Alternating co-attention (seed 000; Lu et al. 2016): question -> image -> question, repeated.

Lu et al.'s guided attention ``A(X; g)``::

    H = tanh(W_x X + W_g g),  a = softmax(w_hx^T H),  x_hat = sum_i a_i x_i

First the question is summarised with no guidance (g = 0), then each step attends the grid
guided by the current question vector and the words guided by the attended image vector, so
each attention is refined by the other modality's latest view. Every step has its own
weights. ``spatial_constraint`` adds the log of the seed's sigmoid(MLP(box)) cell weights to
every image attention's logits (``add_log_prior``): softmax(l + log w) is proportional to
w * exp(l), a down-weighting whatever the logits' sign.
"""

from __future__ import annotations

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


class GuidedAttention(nn.Module):
    """Attention logits of Lu et al.'s ``A(X; g)``; ``guided=False`` is their ``g = 0`` case."""

    def __init__(self, dim: int, guided: bool = True) -> None:
        super().__init__()
        self.key = nn.Linear(dim, dim)
        self.guide = nn.Linear(dim, dim) if guided else None
        # No bias: a shift of the logits is lost in the softmax (its gradient is zero).
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, tokens: Tensor, guide: Tensor | None = None) -> Tensor:
        """tokens [B, L, D], guide [B, D] -> logits [B, L]."""
        hidden = self.key(tokens)
        if self.guide is not None:
            hidden = hidden + self.guide(guide).unsqueeze(1)
        return self.score(torch.tanh(hidden)).squeeze(-1)


class AlternatingCoAttention(FusionBlock):
    """``steps`` rounds of image attention guided by the question and vice versa."""

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
    ) -> None:
        super().__init__(visual_channels, text_dim)
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
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
        self.summary = GuidedAttention(hidden_dim, guided=False)
        self.image_steps = nn.ModuleList(GuidedAttention(hidden_dim) for _ in range(steps))
        self.question_steps = nn.ModuleList(GuidedAttention(hidden_dim) for _ in range(steps))
        self.dropout = nn.Dropout(attention_dropout)
        self.out_proj = nn.Linear(3 * hidden_dim, hidden_dim)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        x = self.inputs(visual, text, text_mask)
        cells, words, mask, constraint = x.cells, x.words, x.mask, x.constraint  # [B,M|N,D]
        height, width = x.height, x.width
        mean_cell = cells.mean(dim=1) if self.residual else None
        mean_word = masked_mean(words, mask) if self.residual else None

        question, question_att = self._attend(words, self.summary(words), mask, mean_word)
        for image_attention, question_attention in zip(
            self.image_steps, self.question_steps, strict=True
        ):
            image_logits = add_log_prior(image_attention(cells, question), constraint)
            image, image_att = self._attend(cells, image_logits, None, mean_cell)
            question, question_att = self._attend(
                words, question_attention(words, image), mask, mean_word
            )

        features = self.out_proj(torch.cat([image, question, image * question], dim=-1))
        attention = {"image": image_att.unflatten(-1, (height, width)), "question": question_att}
        return FusionOutput(features=features, attention=attention)

    def _attend(
        self, tokens: Tensor, logits: Tensor, valid: Tensor | None, residual: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Masked (top-k) softmax of ``logits`` and the tokens it pools: (vector, weights)."""
        weights = masked_softmax(logits, keep_top_k(logits, self.top_k, valid))
        pooled = (self.dropout(weights).unsqueeze(1) @ tokens).squeeze(1)
        return (pooled if residual is None else pooled + residual), weights
