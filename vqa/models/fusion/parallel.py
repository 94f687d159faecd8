"""Parallel co-attention (seed 000; Lu et al. 2016): image and question attend at once.

Both attentions come from one scaled affinity between every word and every grid cell
(Q [N, D] the projected words, V [M, D] the positioned grid tokens, linear maps written as
functions, softmax over the real words only for a_q)::

    S = W_b(Q) V^T / sqrt(D)                                                    [N, M]

``form="maxpool"`` (the seed's form): a cell's logit is its best affinity over the real words,
a word's logit its best affinity over the cells, with no tanh::

    a_v = softmax_m(max_n S_nm),  a_q = softmax_n(max_m S_nm)

The seed's literal softmax(max tanh(S)) ranks the same (tanh is monotonic), but once trained
affinities grow tanh saturates to 1 on every cell, attention turns exactly uniform and its
gradient vanishes, which is what it did in a trained model here.
``form="lu"``: C = tanh(S) transfers each modality into the other's space (padding rows of C
are zero)::

    H_v = tanh(W_v(V) + C^T W_q(Q)),  a_v = softmax_m(w_hv(H_v))
    H_q = tanh(W_q(Q) + C W_v(V)),    a_q = softmax_n(w_hq(H_q))

``spatial_constraint`` adds the log of the cells' prior weights to the image logits in either
form (``add_log_prior``); ``top_k`` keeps the k largest logits of each softmax. The attended
cell and word vectors (plus the mean cell / mean real word with ``residual``) are fused as
[v, q, v * q] and projected to ``hidden_dim``.
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
    masked_max,
    masked_mean,
    masked_softmax,
)

FORMS = ("maxpool", "lu")


class ParallelCoAttention(FusionBlock):
    """Co-attention over the last visual stage from a single word x cell affinity matrix."""

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        hidden_dim: int = 512,
        form: str = "maxpool",
        top_k: int | None = None,
        attention_dropout: float = 0.1,
        residual: bool = True,
        positional: bool = True,
        spatial_constraint: bool = False,
        grid_norm: str = "batch",
    ) -> None:
        super().__init__(visual_channels, text_dim)
        if form not in FORMS:
            raise ValueError(f"form={form!r} must be one of {FORMS}")
        self.form = form
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
        self.affinity = nn.Linear(hidden_dim, hidden_dim, bias=False)  # W_b
        if form == "lu":
            self.image_hidden = nn.Linear(hidden_dim, hidden_dim)  # W_v
            self.text_hidden = nn.Linear(hidden_dim, hidden_dim)  # W_q
            self.image_score = nn.Linear(hidden_dim, 1)  # w_hv
            self.text_score = nn.Linear(hidden_dim, 1)  # w_hq
        self.dropout = nn.Dropout(attention_dropout)
        self.out_proj = nn.Linear(3 * hidden_dim, hidden_dim)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        x = self.inputs(visual, text, text_mask)
        cells, words, mask, constraint = x.cells, x.words, x.mask, x.constraint  # [B,M|N,D]
        height, width = x.height, x.width

        scores = self.affinity(words) @ cells.transpose(1, 2) / math.sqrt(cells.shape[-1])
        if self.form == "maxpool":
            image_logits = masked_max(scores, mask)  # [B, M]
            question_logits = scores.amax(dim=-1)  # [B, N]
        else:
            # C = tanh(scores); padding rows must not feed the transfer sums C^T (W_q Q).
            affinity = torch.tanh(scores).masked_fill(~mask.unsqueeze(-1), 0.0)
            image_hidden, text_hidden = self.image_hidden(cells), self.text_hidden(words)
            image_logits = self.image_score(
                torch.tanh(image_hidden + affinity.transpose(1, 2) @ text_hidden)
            ).squeeze(-1)
            question_logits = self.text_score(
                torch.tanh(text_hidden + affinity @ image_hidden)
            ).squeeze(-1)

        image_logits = add_log_prior(image_logits, constraint)
        image_att = masked_softmax(image_logits, keep_top_k(image_logits, self.top_k))
        question_att = masked_softmax(
            question_logits, keep_top_k(question_logits, self.top_k, mask)
        )
        attended_cells = (self.dropout(image_att).unsqueeze(1) @ cells).squeeze(1)
        attended_words = (self.dropout(question_att).unsqueeze(1) @ words).squeeze(1)
        if self.residual:
            attended_cells = attended_cells + cells.mean(dim=1)
            attended_words = attended_words + masked_mean(words, mask)
        features = self.out_proj(
            torch.cat([attended_cells, attended_words, attended_cells * attended_words], dim=-1)
        )
        attention = {"image": image_att.unflatten(-1, (height, width)), "question": question_att}
        return FusionOutput(features=features, attention=attention)
