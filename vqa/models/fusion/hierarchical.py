"""Hierarchical question-image co-attention (Lu, Yang, Batra and Parikh, NeurIPS 2016).

The question is read at three granularities, each co-attended with the image grid:

* word: projected token features;
* phrase: unigram/bigram/trigram 1-D convolutions, max over the three widths per position;
* sentence: an LSTM over the phrase features (Lu et al.'s "question level").

Per level the image and question are co-attended (parallel or alternating, as in the paper;
``attention.LuCoAttention`` and ``attention.AlternatingAttention``) and the attended pairs are
combined recursively, so coarser levels refine finer ones::

    h_w = tanh(W_w(q_w + v_w));  h_p = tanh(W_p[q_p + v_p, h_w]);  h_s = tanh(W_s[q_s + v_s, h_p])

``spatial_constraint`` adds the log of the cells' prior weights to every level's image logits
before their softmax (``add_log_prior``). ``cell_conditioning`` and ``count`` are the options
every single-stage block shares (``SingleStageFusion``): every level then attends over the
question-conditioned cells, and their scaled sum is appended to ``h_s``.

Padding is zeroed before every convolution and masked after every level, so padded tokens
never reach a real position.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vqa.models.fusion.attention import AlternatingAttention, LuCoAttention, pool
from vqa.models.fusion.base import FusionOutput, GridWords, SingleStageFusion

LEVELS = ("word", "phrase", "sentence")
NGRAM_WIDTHS = (1, 2, 3)

# Each level's co-attention: Lu et al.'s parallel form without biases and with the 1/sqrt(D)
# applied as a product, or one alternating step without biases.
COATTENTIONS = {
    "parallel": lambda dim: LuCoAttention(dim, form="lu", bias=False, scaling="multiply"),
    "alternating": lambda dim: AlternatingAttention(dim, steps=1, bias=False),
}
# Names the levels' layers had before the attention maths had one home (level-relative).
_LEVEL_LEGACY_KEYS = {
    # parallel levels
    "bilinear.": "affinity.",
    "image.weight": "image_hidden.weight",
    "question.weight": "text_hidden.weight",
    "question_score.": "text_score.",
    # alternating levels
    "summarise.feature.": "summary.key.",
    "summarise.": "summary.",
    "image.feature.": "image_steps.0.key.",
    "image.": "image_steps.0.",
    "question.feature.": "question_steps.0.key.",
    "question.": "question_steps.0.",
}


class HierarchicalCoAttention(SingleStageFusion):
    """Word/phrase/sentence co-attention over the last visual stage, combined recursively."""

    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        f"coattention.{level}.{old}": f"coattention.{level}.{new}"
        for level in range(len(LEVELS))
        for old, new in _LEVEL_LEGACY_KEYS.items()
    }

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
        grid_stride: int = 1,
        cell_conditioning: bool = False,
        count: bool = False,
        question_norm: str = "batch",
        cell_context: int = 0,
    ) -> None:
        if mode not in COATTENTIONS:
            raise ValueError(f"mode must be one of {sorted(COATTENTIONS)}, got {mode!r}")
        super().__init__(
            visual_channels,
            text_dim,
            hidden_dim,
            top_k=top_k,
            attention_dropout=attention_dropout,
            positional=positional,
            spatial_constraint=spatial_constraint,
            grid_norm=grid_norm,
            grid_stride=grid_stride,
            cell_conditioning=cell_conditioning,
            count=count,
            question_norm=question_norm,
            cell_context=cell_context,
        )
        self.ngrams = nn.ModuleList(nn.Conv1d(hidden_dim, hidden_dim, w) for w in NGRAM_WIDTHS)
        self.sentence_rnn = nn.LSTM(hidden_dim, hidden_dim, batch_first=True)
        self.coattention = nn.ModuleList(COATTENTIONS[mode](hidden_dim) for _ in LEVELS)
        # Word level sees q_w + v_w; coarser levels also see the previous level's h.
        self.combine = nn.ModuleList(
            nn.Linear(hidden_dim if i == 0 else 2 * hidden_dim, hidden_dim)
            for i in range(len(LEVELS))
        )

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

    def attend(self, x: GridWords) -> FusionOutput:
        cells, words, mask, constraint = x.cells, x.words, x.mask, x.constraint  # [B,M|N,D]
        height, width = x.height, x.width
        phrases = self._phrases(words, mask)
        levels = (words, phrases, self._sentence(phrases, mask))

        attention: dict[str, Tensor] = {}
        hidden: Tensor | None = None
        for name, tokens, coattention, combine in zip(
            LEVELS, levels, self.coattention, self.combine, strict=True
        ):
            image_att, question_att = coattention.maps(cells, tokens, mask, constraint, self.top_k)
            joint = pool(image_att, cells, self.dropout) + pool(question_att, tokens, self.dropout)
            if hidden is not None:
                joint = torch.cat([joint, hidden], dim=-1)
            hidden = torch.tanh(combine(joint))
            attention[f"image/{name}"] = image_att.unflatten(-1, (height, width))
            attention[f"question/{name}"] = question_att
        return FusionOutput(features=hidden, attention=attention)
