"""Conditioning fields: categorical labels a question carries besides its text (the quadrant it
is about, an anatomy label, a camera), as one learned vector per question.

Each field has an embedding table of ``n + 1`` rows for its ``n`` known values (the train
split's, in the datamodule's order): row 0 is the learned *unknown*, for a missing value or one
never seen in training, and value ``i`` of the vocabulary is row ``i + 1``. The rows of all
fields are summed. ``VQAModel`` injects the sum into the image maps or into the question tokens
(:func:`film`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

# Same scale as BERT's embedding init: a label starts as a small nudge, not as noise that
# drowns the features it is added to.
CONDITIONING_INIT_STD = 0.02
UNKNOWN = 0


class ConditioningEmbedding(nn.Module):
    """``ids`` [B, F] long (column f: field f's value index, 0 = unknown) -> [B, dim], the sum
    of the fields' embeddings.

    ``sizes`` maps each field to its number of known values, in the column order of ``ids``.
    """

    def __init__(self, sizes: Mapping[str, int], dim: int) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("conditioning needs at least one field")
        for name, count in sizes.items():
            if not name or "." in name:
                raise ValueError(f"conditioning field name {name!r} must be non-empty, no '.'")
            if int(count) < 0:
                raise ValueError(f"conditioning field {name!r} has {count} values")
        self.fields = list(sizes)
        self.dim = dim
        self.embeddings = nn.ModuleDict(
            {name: nn.Embedding(int(count) + 1, dim) for name, count in sizes.items()}
        )
        for table in self.embeddings.values():
            nn.init.normal_(table.weight, std=CONDITIONING_INIT_STD)

    @property
    def sizes(self) -> dict[str, int]:
        """Known values per field (rows minus the unknown one)."""
        return {name: table.num_embeddings - 1 for name, table in self.embeddings.items()}

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.shape[1] != len(self.fields):
            raise ValueError(
                f"conditioning_ids must be [B, {len(self.fields)}] (fields {self.fields}), "
                f"got {tuple(ids.shape)}"
            )
        tables = list(self.embeddings.values())
        total = tables[0](ids[:, 0])
        for column, table in enumerate(tables[1:], start=1):
            total = total + table(ids[:, column])
        return total

    def unknown_ids(self, batch_size: int, device: torch.device) -> Tensor:
        """Every field unknown for every question: what a caller without labels gets."""
        return torch.full((batch_size, len(self.fields)), UNKNOWN, dtype=torch.long, device=device)


def film(tokens: Tensor, conditioning: Tensor) -> Tensor:
    """FiLM of the tokens [B, N, D] by ``conditioning`` [B, 2D]: ``t * (1 + gamma) + beta``
    with ``(gamma, beta)`` its two halves. With the small init both start near 0, so the
    tokens start as they are."""
    gamma, beta = conditioning.to(tokens.dtype).unsqueeze(1).chunk(2, dim=-1)
    return tokens * (1 + gamma) + beta


def add_to_maps(maps: list[Tensor], conditioning: Tensor) -> list[Tensor]:
    """Each stage map [B, C_s, H, W] plus the first C_s entries of its question's vector
    ``conditioning`` [B, max C_s], at every cell."""
    return [
        stage + conditioning[:, : stage.shape[1]].to(stage.dtype).view(*stage.shape[:2], 1, 1)
        for stage in maps
    ]
