"""Answer head: fused features -> one logit per answer of the vocabulary."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear.

    LayerNorm rather than BatchNorm: it keeps every sample independent of its batch (batch
    size 1 at inference, modality-dropped samples mixed with normal ones) and its scale
    tames the differently sized fused features of the fusion blocks.
    """

    def __init__(
        self, in_features: int, num_answers: int, hidden_dim: int = 1024, dropout: float = 0.2
    ) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_answers),
        )
        self.in_features = in_features
        self.num_answers = num_answers
