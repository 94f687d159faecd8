"""The attention maths the fusion blocks share, written once.

Sources, each block's docstring says which it follows:

* Lu, Yang, Batra and Parikh, "Hierarchical Question-Image Co-Attention for Visual Question
  Answering" (NeurIPS 2016): the guided attention ``A(X; g)``, parallel co-attention through an
  affinity matrix between words and image regions, and alternating co-attention.
* Vaswani et al., "Attention Is All You Need" (NeurIPS 2017): scaled dot-product affinities and
  several heads attending in parallel subspaces.

Pure functions (no weights): ``scaled``, ``attend`` (masked, optionally top-k softmax),
``pool`` (weighted sum with optional dropout and residual), ``attention_pool`` (both) and
``affinity_attention`` (the word x cell affinity attention of multihead and cot). Modules:
``GuidedAttention`` (logits of one guided attention) and the co-attentions, subclasses of
``CoAttention``: ``AlternatingAttention``, ``LuCoAttention`` and ``MultiheadAffinityAttention``.
A co-attention is called as ``(cells [B, M, D], words [B, N, D], mask [B, N], prior, top_k,
dropout, residual)`` and returns a ``CoAttended`` (the contract ``SingleStageFusion`` relies
on); its ``maps`` gives the attention weights alone, for a caller that pools them itself
(hierarchical).

Conventions: ``mask`` is True on real words; ``prior`` is the spatial constraint's cell weights
[1, M] (or None), added as ``log w`` to the logits over cells (``add_log_prior``); ``top_k``
keeps the k largest valid logits of each softmax (None = dense); ``residual`` adds the mean
cell and the mean real word to the attended vectors, so a block starts from the plain means.
Each module takes those means where the block it came from took them: the same values either
way, but autograd sums the gradients of the means and of the attention in that order, so
training stays bit-identical.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vqa.models.fusion.base import (
    CoAttended,
    add_log_prior,
    keep_top_k,
    masked_max,
    masked_mean,
    masked_softmax,
)

SCALINGS = ("divide", "multiply")
FORMS = ("maxpool", "lu")


def scaled(scores: Tensor, dim: int, scaling: str = "divide") -> Tensor:
    """``scores / sqrt(dim)``, the scaled dot product: keeps the logits' spread independent of
    the width. ``"divide"`` divides by sqrt(dim), ``"multiply"`` multiplies by dim ** -0.5: the
    same number, but floating point rounds the two differently in the last bit, so each block
    keeps the one it has always used (and its checkpoints were trained with)."""
    if scaling == "divide":
        return scores / math.sqrt(dim)
    return scores * dim**-0.5


def attend(logits: Tensor, valid: Tensor | None = None, top_k: int | None = None) -> Tensor:
    """Softmax over the last dim, restricted to ``valid`` keys (broadcastable, True = keep)
    and, with ``top_k``, to the k largest of them; exactly 0 elsewhere."""
    return masked_softmax(logits, keep_top_k(logits, top_k, valid))


def pool(
    weights: Tensor,
    tokens: Tensor,
    dropout: nn.Module | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``sum_i a_i x_i``: weights [B, ..., L], tokens [B, ..., L, d] -> [B, ...*d] (several
    heads come out concatenated), after ``dropout`` on the weights, plus ``residual``."""
    if dropout is not None:
        weights = dropout(weights)
    pooled = (weights.unsqueeze(-2) @ tokens).flatten(1)
    return pooled if residual is None else pooled + residual


def attention_pool(
    tokens: Tensor,
    logits: Tensor,
    valid: Tensor | None = None,
    top_k: int | None = None,
    dropout: nn.Module | None = None,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``attend`` then ``pool``: (attended vector [B, D], attention weights [B, L])."""
    weights = attend(logits, valid, top_k)
    return pool(weights, tokens, dropout, residual), weights


def affinity_attention(
    queries: Tensor,
    keys: Tensor,
    mask: Tensor,
    top_k: int | None = None,
    prior: Tensor | None = None,
    scaling: str = "divide",
) -> tuple[Tensor, Tensor]:
    """Image and question attention from one scaled word x cell affinity.

    queries [B, ..., N, d] (words), keys [B, ..., M, d] (cells), any leading dims after the
    batch (heads) -> image [B, ..., M], question [B, ..., N]. With ``S = q k^T / sqrt(d)``:

    * P = softmax over cells of S (+ log prior): each word's distribution over cells;
    * R = softmax over real words of S^T: each cell's distribution over words;
    * question attention a_q = mean over cells of R (0 on padding);
    * image attention a_v = a_q P (the word distributions weighted by a_q).

    A prior would not change R: a per-cell shift is lost in a softmax over words.
    """
    affinity = scaled(queries @ keys.transpose(-1, -2), queries.shape[-1], scaling)
    per_word = attend(add_log_prior(affinity, prior), None, top_k)
    by_cell = affinity.transpose(-1, -2)
    valid = mask.reshape(mask.shape[0], *[1] * (by_cell.dim() - 2), mask.shape[-1])
    question = attend(by_cell, valid, top_k).mean(dim=-2)
    image = (question.unsqueeze(-2) @ per_word).squeeze(-2)
    return image, question


class CoAttention(nn.Module):
    """A co-attention between grid cells [B, M, D] and words [B, N, D].

    ``maps`` gives the attention weights, image and question; ``forward`` pools the cells and
    the words with them (after ``dropout``; plus the mean cell and mean real word with
    ``residual``) and returns a ``CoAttended``. By default ``forward`` is built on ``maps``
    (both maps at once, each pooling its own tokens, split by ``values``, e.g. into heads,
    with the plotted maps given by ``merged``) and ``maps`` on ``forward``: a subclass
    defines one of the two.
    """

    def maps(
        self,
        cells: Tensor,
        words: Tensor,
        mask: Tensor,
        prior: Tensor | None = None,
        top_k: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(image weights [B, ..., M], question weights [B, ..., N]), no dropout or residual."""
        out = self(cells, words, mask, prior, top_k)
        return out.image_att, out.question_att

    def forward(
        self,
        cells: Tensor,
        words: Tensor,
        mask: Tensor,
        prior: Tensor | None = None,
        top_k: int | None = None,
        dropout: nn.Module | None = None,
        residual: bool = False,
    ) -> CoAttended:
        image_att, question_att = self.maps(cells, words, mask, prior, top_k)
        image = pool(image_att, self.values(cells), dropout)
        question = pool(question_att, self.values(words), dropout)
        if residual:
            image, question = image + cells.mean(dim=1), question + masked_mean(words, mask)
        return CoAttended(image, question, self.merged(image_att), self.merged(question_att))

    def values(self, tokens: Tensor) -> Tensor:
        """What the weights pool: the tokens themselves."""
        return tokens

    def merged(self, weights: Tensor) -> Tensor:
        """The map to plot from the weights: the weights themselves."""
        return weights


class GuidedAttention(nn.Module):
    """Logits of Lu et al.'s guided attention ``A(X; g)``: ``w^T tanh(W_x x_i + W_g g)`` per
    token; ``guided=False`` is their ``g = 0`` case (no W_g, so no dead parameters).

    ``bias``: whether W_x and W_g have biases; w never does (a shift of the logits is lost in
    the softmax, its gradient is zero).
    """

    def __init__(self, dim: int, guided: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.key = nn.Linear(dim, dim, bias=bias)
        self.guide = nn.Linear(dim, dim, bias=bias) if guided else None
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, tokens: Tensor, guide: Tensor | None = None) -> Tensor:
        """tokens [B, L, D], guide [B, D] -> logits [B, L]."""
        hidden = self.key(tokens)
        if self.guide is not None:
            hidden = hidden + self.guide(guide).unsqueeze(1)
        return self.score(torch.tanh(hidden)).squeeze(-1)


class AlternatingAttention(CoAttention):
    """Lu et al.'s alternating co-attention: question -> image -> question, ``steps`` times.

    The question is first summarised unguided (g = 0); then each step attends the cells
    guided by the current question vector (plus log prior on the cell logits) and the words
    guided by the attended image vector, so each attention is refined by the other modality's
    latest view. Every step has its own weights; ``dropout`` and ``residual`` apply to every
    pooling, the intermediate ones included.
    """

    def __init__(self, dim: int, steps: int = 1, bias: bool = True) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        self.summary = GuidedAttention(dim, guided=False, bias=bias)
        self.image_steps = nn.ModuleList(GuidedAttention(dim, bias=bias) for _ in range(steps))
        self.question_steps = nn.ModuleList(GuidedAttention(dim, bias=bias) for _ in range(steps))

    def forward(
        self,
        cells: Tensor,
        words: Tensor,
        mask: Tensor,
        prior: Tensor | None = None,
        top_k: int | None = None,
        dropout: nn.Module | None = None,
        residual: bool = False,
    ) -> CoAttended:
        mean_cell = cells.mean(dim=1) if residual else None
        mean_word = masked_mean(words, mask) if residual else None
        question, question_att = attention_pool(
            words, self.summary(words), mask, top_k, dropout, mean_word
        )
        for image_step, question_step in zip(self.image_steps, self.question_steps, strict=True):
            image_logits = add_log_prior(image_step(cells, question), prior)
            image, image_att = attention_pool(cells, image_logits, None, top_k, dropout, mean_cell)
            question, question_att = attention_pool(
                words, question_step(words, image), mask, top_k, dropout, mean_word
            )
        return CoAttended(image, question, image_att, question_att)


class LuCoAttention(CoAttention):
    """Parallel co-attention: both attentions read one word x cell affinity.

    With Q [N, D] the words, V [M, D] the cells and linear maps written as functions::

        S = W_b(Q) V^T / sqrt(D)                                                    [N, M]

    ``form="lu"`` (Lu et al.): C = tanh(S), with padding rows zeroed so padded words cannot
    steer the cells, transfers each modality into the other's space::

        H_v = tanh(W_v(V) + C^T W_q(Q)),  image logits    = w_hv(H_v)
        H_q = tanh(W_q(Q) + C W_v(V)),    question logits = w_hq(H_q)

    Lu et al. have no 1/sqrt(D); it keeps tanh out of saturation at realistic widths.
    ``form="maxpool"`` (the design document's form; no transfer weights, no tanh): a cell's
    logit is its best affinity over the real words, a word's its best affinity over cells.
    The cell logits get ``log prior``; the softmaxes run over cells and over real words.

    ``bias`` (the transfer and score layers; W_b has none) and ``scaling`` (see ``scaled``) are
    options so each block keeps the exact maths its weights were trained with.
    """

    def __init__(
        self, dim: int, form: str = "lu", bias: bool = True, scaling: str = "divide"
    ) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form={form!r} must be one of {FORMS}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r} must be one of {SCALINGS}")
        self.form = form
        self.scaling = scaling
        self.affinity = nn.Linear(dim, dim, bias=False)  # W_b
        if form == "lu":
            self.image_hidden = nn.Linear(dim, dim, bias=bias)  # W_v
            self.text_hidden = nn.Linear(dim, dim, bias=bias)  # W_q
            self.image_score = nn.Linear(dim, 1, bias=bias)  # w_hv
            self.text_score = nn.Linear(dim, 1, bias=bias)  # w_hq

    def logits(self, cells: Tensor, words: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(image logits [B, M], question logits [B, N]), before the prior."""
        scores = scaled(self.affinity(words) @ cells.transpose(1, 2), cells.shape[-1], self.scaling)
        if self.form == "maxpool":
            return masked_max(scores, mask), scores.amax(dim=-1)
        affinity = torch.tanh(scores).masked_fill(~mask.unsqueeze(-1), 0.0)
        image_hidden, text_hidden = self.image_hidden(cells), self.text_hidden(words)
        image_logits = self.image_score(
            torch.tanh(image_hidden + affinity.transpose(1, 2) @ text_hidden)
        ).squeeze(-1)
        question_logits = self.text_score(
            torch.tanh(text_hidden + affinity @ image_hidden)
        ).squeeze(-1)
        return image_logits, question_logits

    def maps(
        self,
        cells: Tensor,
        words: Tensor,
        mask: Tensor,
        prior: Tensor | None = None,
        top_k: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(image attention [B, M], question attention [B, N])."""
        image_logits, question_logits = self.logits(cells, words, mask)
        return attend(add_log_prior(image_logits, prior), None, top_k), attend(
            question_logits, mask, top_k
        )


class MultiheadAffinityAttention(CoAttention):
    """``affinity_attention`` in ``num_heads`` subspaces at once (Vaswani et al.'s heads).

    Queries and keys are learned projections of the words and cells; the values are the
    head-split cells and words themselves, so each head's maps are exactly the weights of its
    pooled features. The pooled heads are concatenated; the maps returned for plotting are the
    heads' mean.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> Tensor:
        """[B, L, h*d_h] -> [B, h, L, d_h]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def maps(
        self,
        cells: Tensor,
        words: Tensor,
        mask: Tensor,
        prior: Tensor | None = None,
        top_k: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per head: (image weights [B, h, M], question weights [B, h, N])."""
        return affinity_attention(
            self.heads(self.query(words)), self.heads(self.key(cells)), mask, top_k, prior
        )

    def values(self, tokens: Tensor) -> Tensor:
        """Each head pools its own slice of the tokens: [B, h, L, d_h]."""
        return self.heads(tokens)

    def merged(self, weights: Tensor) -> Tensor:
        """The heads' mean."""
        return weights.mean(dim=1)
