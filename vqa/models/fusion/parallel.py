"""Parallel co-attention (Lu et al., NeurIPS 2016): image and question attend at once.

Both attentions come from one scaled affinity between every word and every grid cell
(Q [N, D] the projected words, V [M, D] the positioned grid tokens, linear maps written as
functions, softmax over the real words only for a_q)::

    S = W_b(Q) V^T / sqrt(D)                                                    [N, M]

``form="maxpool"`` (the design document's form): a cell's logit is its best affinity over the
real words, a word's logit its best affinity over the cells, with no tanh::

    a_v = softmax_m(max_n S_nm),  a_q = softmax_n(max_m S_nm)

A literal softmax(max tanh(S)) ranks the same (tanh is monotonic), but once trained affinities
grow, tanh saturates to 1 on every cell, the attention turns exactly uniform and its gradient
vanishes; hence no tanh here.
``form="lu"`` (Lu et al.'s parallel co-attention): C = tanh(S) transfers each modality into the
other's space (padding rows of C are zero)::

    H_v = tanh(W_v(V) + C^T W_q(Q)),  a_v = softmax_m(w_hv(H_v))
    H_q = tanh(W_q(Q) + C W_v(V)),    a_q = softmax_n(w_hq(H_q))

``spatial_constraint`` adds the log of the cells' prior weights to the image logits in either
form (``add_log_prior``); ``top_k`` keeps the k largest logits of each softmax. The attended
cell and word vectors (plus the mean cell / mean real word with ``residual``) are fused as
[v, q, v * q] and projected to ``hidden_dim``. The maths is ``attention.LuCoAttention``.
"""

from __future__ import annotations

from typing import ClassVar

from vqa.models.fusion.attention import LuCoAttention
from vqa.models.fusion.base import SingleStageFusion


class ParallelCoAttention(SingleStageFusion):
    """Co-attention over the last visual stage from a single word x cell affinity matrix."""

    # Before the attention maths had one home, its layers sat on the block itself.
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        f"{name}.": f"attention.{name}."
        for name in ("affinity", "image_hidden", "text_hidden", "image_score", "text_score")
    }

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
            lambda: LuCoAttention(hidden_dim, form=form, bias=True, scaling="divide"),
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
