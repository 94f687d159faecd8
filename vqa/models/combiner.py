"""Combiners: the K per-stream fused vectors of a question -> one vector for the answer head.

With several images per question (visual streams) each stream has its own fusion block, which
already read the question; a combiner turns their ``features`` [B, K, D] into [B, out_dim].
Built by Hydra from the `combiner` config group with ``_partial_: true`` and finished by
``VQAModel`` with the sizes only it knows::

    combiner = cfg_partial(in_features=fusion.out_dim, num_streams=K)
    combined = combiner(features)  # [B, K, D] -> [B, combiner.out_dim]

Both keep the order of the streams: "more red shapes in the left image than in the right one"
has another answer when the two images swap.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Same scale as BERT's embedding init (and VQAModel's null inputs).
STREAM_EMBEDDING_INIT_STD = 0.02


class ConcatCombiner(nn.Module):
    """The stream vectors concatenated in stream order -> Linear -> ReLU -> Dropout.

    The concatenation puts each stream at its own input weights, so order is kept by
    construction, and the layer can compare streams (a count in one against a count in the
    other) directly.
    """

    def __init__(
        self, in_features: int, num_streams: int, hidden_dim: int = 512, dropout: float = 0.1
    ) -> None:
        super().__init__()
        _check_sizes(in_features, num_streams)
        self.in_features = in_features
        self.num_streams = num_streams
        self.out_dim = hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(num_streams * in_features, hidden_dim), nn.ReLU(), nn.Dropout(dropout)
        )

    def forward(self, features: Tensor) -> Tensor:
        """[B, K, D] -> [B, hidden_dim]."""
        _check_input(features, self.num_streams, self.in_features)
        return self.mlp(features.flatten(1))


class AttentionCombiner(nn.Module):
    """Softmax attention over the streams, each stream vector plus a learned stream embedding.

    Each stream's value is ``v_k = f_k + e_k`` (``e_k`` the stream's embedding); a small MLP
    scores each value and a softmax over the K streams weighs them. The stream vectors were
    fused with the question, so the weights are question-conditioned ("what color is the
    circle in the right image?" can look at the right stream only).

    Output: the weighted sum and the K weights, ``[sum_k a_k v_k, a_1..a_K]`` (out_dim = D + K).
    A weighted sum alone is blind to which stream said what (swapping two images with equal
    weights gives the same sum); the stream embeddings inside it and the weights appended
    tell the head where the pooled content came from, so order survives.
    """

    def __init__(self, in_features: int, num_streams: int, hidden_dim: int = 256) -> None:
        super().__init__()
        _check_sizes(in_features, num_streams)
        self.in_features = in_features
        self.num_streams = num_streams
        self.out_dim = in_features + num_streams
        # An nn.Embedding (not a bare matrix) so the optimizer groups leave it undecayed.
        self.stream_embedding = nn.Embedding(num_streams, in_features)
        nn.init.normal_(self.stream_embedding.weight, std=STREAM_EMBEDDING_INIT_STD)
        self.score = nn.Sequential(
            nn.Linear(in_features, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1)
        )

    def forward(self, features: Tensor) -> Tensor:
        """[B, K, D] -> [B, D + K]."""
        _check_input(features, self.num_streams, self.in_features)
        values = features + self.stream_embedding.weight.to(features.dtype)
        weights = torch.softmax(self.score(values).squeeze(-1), dim=-1)
        pooled = (weights.unsqueeze(-1) * values).sum(dim=1)
        return torch.cat([pooled, weights], dim=-1)


def _check_sizes(in_features: int, num_streams: int) -> None:
    if in_features < 1 or num_streams < 2:
        raise ValueError(
            f"a combiner needs in_features >= 1 and num_streams >= 2 (one stream needs none), "
            f"got in_features={in_features}, num_streams={num_streams}"
        )


def _check_input(features: Tensor, num_streams: int, in_features: int) -> None:
    if features.dim() != 3 or tuple(features.shape[1:]) != (num_streams, in_features):
        raise ValueError(
            f"the combiner takes stream features [B, {num_streams}, {in_features}], "
            f"got {tuple(features.shape)}"
        )
