"""Hierarchical question-image co-attention (Lu et al., NeurIPS 2016).

The question is read at three granularities, each co-attended with the image grid:

* word: projected token features;
* phrase: unigram/bigram/trigram 1-D convolutions, max over the three widths per position;
* sentence: an LSTM over the phrase features (Lu et al.'s "question level").

Per level the image and question are co-attended (parallel or alternating, as in the paper)
and the attended pairs are combined recursively, so coarser levels refine finer ones::

    h_w = tanh(W_w(q_w + v_w));  h_p = tanh(W_p[q_p + v_p, h_w]);  h_s = tanh(W_s[q_s + v_s, h_p])

``spatial_constraint`` adds the log of the cells' prior weights to every level's image logits
before their softmax (``add_log_prior``).

Padding is zeroed before every convolution and masked after every level, so padded tokens
never reach a real position.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqa.models.fusion.base import (
    FusionBlock,
    FusionOutput,
    GridAndWords,
    add_log_prior,
    keep_top_k,
    masked_softmax,
)

LEVELS = ("word", "phrase", "sentence")
NGRAM_WIDTHS = (1, 2, 3)


def _attend(logits: Tensor, valid: Tensor | None, top_k: int | None) -> Tensor:
    """Masked (optionally top-k sparse) attention distribution over the last dim."""
    return masked_softmax(logits, keep_top_k(logits, top_k, valid))


def _pool(weights: Tensor, x: Tensor) -> Tensor:
    """Attention-weighted sum: weights [B, L], x [B, L, D] -> [B, D]."""
    return (weights.unsqueeze(1) @ x).squeeze(1)


class ParallelLevel(nn.Module):
    """Lu et al. parallel co-attention: both attentions read one affinity matrix C.

    C = tanh(Q W_b V^T / sqrt(d)); H_v = tanh(V W_v + C^T Q W_q); H_q = tanh(Q W_q + C V W_v);
    a_v = softmax(H_v w_v [+ log prior]), a_q = softmax(H_q w_q) over real words.
    """

    def __init__(self, dim: int, top_k: int | None) -> None:
        super().__init__()
        self.top_k = top_k
        self.scale = dim**-0.5
        self.bilinear = nn.Linear(dim, dim, bias=False)
        self.image = nn.Linear(dim, dim, bias=False)
        self.question = nn.Linear(dim, dim, bias=False)
        self.image_score = nn.Linear(dim, 1, bias=False)
        self.question_score = nn.Linear(dim, 1, bias=False)

    def forward(
        self, cells: Tensor, words: Tensor, mask: Tensor, constraint: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """cells [B, M, D], words [B, N, D] -> (image attention [B, M], question attention [B, N])."""
        # 1/sqrt(d) keeps tanh out of saturation at realistic widths (Lu et al. have no scale).
        affinity = torch.tanh(self.bilinear(words) @ cells.transpose(1, 2) * self.scale)
        # Padded words must not steer the image attention through C^T.
        affinity = affinity.masked_fill(~mask.unsqueeze(-1), 0.0)
        image, question = self.image(cells), self.question(words)
        image_hidden = torch.tanh(image + affinity.transpose(1, 2) @ question)
        question_hidden = torch.tanh(question + affinity @ image)
        image_logits = add_log_prior(self.image_score(image_hidden).squeeze(-1), constraint)
        image_att = _attend(image_logits, None, self.top_k)
        question_att = _attend(self.question_score(question_hidden).squeeze(-1), mask, self.top_k)
        return image_att, question_att


class GuidedAttention(nn.Module):
    """One alternating step: x_hat = sum_i a_i x_i, a = softmax(w^T tanh(W_x x_i + W_g g)),
    plus log prior_i in the logits for the image step with the spatial constraint."""

    def __init__(self, dim: int, guided: bool, top_k: int | None) -> None:
        super().__init__()
        self.top_k = top_k
        self.feature = nn.Linear(dim, dim, bias=False)
        # The first step has g = 0, so it owns no guide projection (no dead parameters).
        self.guide = nn.Linear(dim, dim, bias=False) if guided else None
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(
        self,
        x: Tensor,
        valid: Tensor | None,
        guide: Tensor | None = None,
        constraint: Tensor | None = None,
    ) -> Tensor:
        """x [B, L, D], guide [B, D] -> attention [B, L]."""
        hidden = self.feature(x)
        if self.guide is not None:
            hidden = hidden + self.guide(guide).unsqueeze(1)
        logits = add_log_prior(self.score(torch.tanh(hidden)).squeeze(-1), constraint)
        return _attend(logits, valid, self.top_k)


class AlternatingLevel(nn.Module):
    """Lu et al. alternating co-attention: summarise question -> attend image -> attend question."""

    def __init__(self, dim: int, top_k: int | None) -> None:
        super().__init__()
        self.summarise = GuidedAttention(dim, guided=False, top_k=top_k)
        self.image = GuidedAttention(dim, guided=True, top_k=top_k)
        self.question = GuidedAttention(dim, guided=True, top_k=top_k)

    def forward(
        self, cells: Tensor, words: Tensor, mask: Tensor, constraint: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """cells [B, M, D], words [B, N, D] -> (image attention [B, M], question attention [B, N])."""
        summary = _pool(self.summarise(words, mask), words)
        image_att = self.image(cells, None, summary, constraint)
        question_att = self.question(words, mask, _pool(image_att, cells))
        return image_att, question_att


class HierarchicalCoAttention(FusionBlock):
    """Word/phrase/sentence co-attention over the last visual stage, combined recursively."""

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        hidden_dim: int = 512,
        mode: str = "parallel",
        top_k: int | None = None,
        attention_dropout: float = 0.1,
        positional: bool = True,
        spatial_constraint: bool = False,
        grid_norm: str = "batch",
    ) -> None:
        super().__init__(visual_channels, text_dim)
        coattention = {"parallel": ParallelLevel, "alternating": AlternatingLevel}
        if mode not in coattention:
            raise ValueError(f"mode must be one of {sorted(coattention)}, got {mode!r}")
        self.out_dim = hidden_dim
        self.inputs = GridAndWords(
            self.visual_channels,
            self.text_dim,
            hidden_dim,
            positional,
            spatial_constraint,
            grid_norm,
        )
        self.ngrams = nn.ModuleList(nn.Conv1d(hidden_dim, hidden_dim, w) for w in NGRAM_WIDTHS)
        self.sentence_rnn = nn.LSTM(hidden_dim, hidden_dim, batch_first=True)
        self.coattention = nn.ModuleList(coattention[mode](hidden_dim, top_k) for _ in LEVELS)
        # Word level sees q_w + v_w; coarser levels also see the previous level's h.
        self.combine = nn.ModuleList(
            nn.Linear(hidden_dim if i == 0 else 2 * hidden_dim, hidden_dim)
            for i in range(len(LEVELS))
        )
        self.dropout = nn.Dropout(attention_dropout)

    def _phrases(self, words: Tensor, mask: Tensor) -> Tensor:
        """Max over unigram/bigram/trigram convolutions at each position.

        Position t of the width-w conv reads words t..t+w-1. Padded words are zeroed first,
        exactly what the conv's own zero padding puts after the sequence end, so neither the
        content nor the amount of padding reaches a real position; padding is masked after.
        """
        padding = ~mask.unsqueeze(-1)
        x = words.masked_fill(padding, 0.0).transpose(1, 2)  # [B, D, N]
        grams = [torch.tanh(conv(F.pad(x, (0, conv.kernel_size[0] - 1)))) for conv in self.ngrams]
        phrases = torch.stack(grams).amax(dim=0).transpose(1, 2)
        return phrases.masked_fill(padding, 0.0)

    def _sentence(self, phrases: Tensor, mask: Tensor) -> Tensor:
        """LSTM over the real phrases only, wherever the padding sits (left, right or inside).

        Real tokens move to the front in order, so padding trails every question; the LSTM is
        causal, so trailing steps never reach a real state. Unlike packing, this needs no
        host sync for the lengths and exports to ONNX.
        """
        real = mask.long()
        # Destination of every token: real ones 0..n-1 in order, padding n..N-1.
        slot = torch.where(mask, real.cumsum(1), real.sum(1, keepdim=True) + (1 - real).cumsum(1))
        index = (slot - 1).unsqueeze(-1).expand_as(phrases)
        compact = torch.zeros_like(phrases).scatter(1, index, phrases)
        states = self.sentence_rnn(compact)[0].gather(1, index)
        return states.masked_fill(~mask.unsqueeze(-1), 0.0)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        x = self.inputs(visual, text, text_mask)
        cells, words, mask, constraint = x.cells, x.words, x.mask, x.constraint  # [B,M|N,D]
        height, width = x.height, x.width
        phrases = self._phrases(words, mask)
        levels = (words, phrases, self._sentence(phrases, mask))

        attention: dict[str, Tensor] = {}
        hidden: Tensor | None = None
        for name, tokens, coattention, combine in zip(
            LEVELS, levels, self.coattention, self.combine, strict=True
        ):
            image_att, question_att = coattention(cells, tokens, mask, constraint)
            joint = _pool(self.dropout(image_att), cells)
            joint = joint + _pool(self.dropout(question_att), tokens)
            if hidden is not None:
                joint = torch.cat([joint, hidden], dim=-1)
            hidden = torch.tanh(combine(joint))
            attention[f"image/{name}"] = image_att.unflatten(-1, (height, width))
            attention[f"question/{name}"] = question_att
        return FusionOutput(features=hidden, attention=attention)
