"""Answer head: fused features -> one logit per answer of the vocabulary."""

from __future__ import annotations

from torch import nn

NORMS = ("layer", "none")


class MLPHead(nn.Sequential):
    """Linear -> LayerNorm (``norm="layer"``) -> GELU -> Dropout -> Linear.

    LayerNorm rather than BatchNorm: it keeps every sample independent of its batch (batch
    size 1 at inference, modality-dropped samples mixed with normal ones) and its scale
    tames the differently sized fused features of the fusion blocks. But it divides each
    sample by its own scale, so a magnitude is lost: a fusion that carries "how many" in the
    size of a sum (``film``) wants ``norm="none"``.
    """

    def __init__(
        self,
        in_features: int,
        num_answers: int,
        hidden_dim: int = 1024,
        dropout: float = 0.2,
        norm: str = "layer",
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"head norm must be one of {NORMS}, got {norm!r}")
        super().__init__(
            nn.Linear(in_features, hidden_dim),
            nn.LayerNorm(hidden_dim) if norm == "layer" else nn.Identity(),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_answers),
        )
        self.in_features = in_features
        self.num_answers = num_answers
