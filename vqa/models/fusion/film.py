"""FiLM fusion: the question conditions every grid cell, then a sum reads the cells out.

Softmax attention over cells (the co-attention blocks) pools a convex mix of cells: it can pick
one object but cannot count, and a visual encoder trained from scratch receives gradient only
through the cells the attention already picks. Here, in the spirit of FiLM (Perez, Strub, de
Vries, Dumoulin and Courville, "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI
2018), where the question modulates every feature map, and of relation networks (Santoro et
al., 2017), every cell passes through one MLP over ``[cell, question, cell * question]``, so
every cell is asked about the question and every cell gets gradient. The conditioned cells are
then

* summed, scaled by a constant rather than divided by the number of cells, so "how many"
  survives (a mean or a softmax would normalise the count away), and optionally
* read by ``glimpses`` softmax attentions over the conditioned cells ("which object"), and
  optionally (``glimpse_positions``) where each glimpse looks: its attention-weighted cell
  centre, and the offset between every two glimpses' centres ("is A left of B" is then the sign
  of one number, rather than something the head must decode from the pooled features), and
  optionally
* read by ``RelationReadout`` (``relation_dim`` > 0): each cell with what lies left of, right
  of, above and below it, summed ("is A left of B": A's cells with B's to their right).

``word_attention``: each cell conditions on its own attention over the words rather than on
their mean (``ConditionedCells.cell_questions``), cells and words attending to each other.

``cell_context`` n > 0: n residual 3 x 3 conv layers over the cells, once per image, so that a
cell sees the whole object it belongs to (``CellContext``).

``grid_stride`` s > 1 makes each s x s patch of the stage map one cell, read by a trained conv,
as the co-attention blocks' option of that name does (a finer map, the same grid).

Cells are a 1x1 conv + BatchNorm + ReLU of the last stage plus an embedding of the cell's box;
the question is the mean of its real words, projected, then (``question_norm: batch``)
batch-normalised. A randomly initialised BERT's mean-pooled questions are nearly all one shared
vector, the part that tells questions apart being small beside it, so ``cell * question``
hardly depends on the question; centring it across the batch is what let the shape questions
be learned at all on frozen random ResNet maps (without it every shape family stayed at its
prior). In scratch experiments these choices learned faster than a linear cell projection with
an attention-pooled question, and attention glimpses slowed the start, hence ``glimpses: 0``.

Attention maps: with glimpses, the image map is their mean; without, each cell's share of the
summed read-out (the sum of its non-negative conditioned features). The question map is uniform
over the real words, which is what the mean does. BatchNorm couples the samples of a batch in
train mode only, as in ``cot``. Both norms fall back to their running statistics on a training
batch of one question (``vqa.models.norms``): the train loader keeps its last partial batch.
"""

from __future__ import annotations

from itertools import combinations
from typing import ClassVar

import torch
from torch import Tensor, nn

from vqa.models.fusion.base import (
    ConditionedCells,
    FusionBlock,
    FusionOutput,
    RelationReadout,
    context_layers,
    grid_boxes,
    summed,
)
from vqa.models.norms import SafeBatchNorm2d


class FiLMFusion(FusionBlock):
    """Question-conditioned cells -> [scaled sum, question, optional attention glimpses]."""

    # Before the conditioning had one home (``ConditionedCells``), its layers sat on the block.
    LEGACY_KEYS: ClassVar[dict[str, str]] = {
        "text_proj.": "conditioning.question.",
        "question_norm.": "conditioning.norm.",
        "cell_mlp.": "conditioning.mlp.",
    }

    def __init__(
        self,
        visual_channels: list[int],
        text_dim: int,
        hidden_dim: int = 512,
        glimpses: int = 0,
        attention_dropout: float = 0.1,
        positional: bool = True,
        question_norm: str = "batch",
        grid_stride: int = 1,
        question_glimpses: int = 0,
        glimpse_positions: bool = False,
        relation_dim: int = 0,
        word_attention: bool = False,
        cell_context: int = 0,
    ) -> None:
        super().__init__(visual_channels, text_dim)
        if glimpses < 0:
            raise ValueError(f"glimpses must be >= 0, got {glimpses}")
        if glimpse_positions and not glimpses:
            raise ValueError("glimpse_positions needs glimpses >= 1 (it reads where they look)")
        if hidden_dim % 2:
            raise ValueError(
                f"hidden_dim must be even (cells are hidden_dim/2 wide), got {hidden_dim}"
            )
        if grid_stride < 1:
            raise ValueError(f"grid_stride={grid_stride} must be >= 1")
        if relation_dim < 0:
            raise ValueError(f"relation_dim must be >= 0 (0: off), got {relation_dim}")
        dim = hidden_dim // 2
        # Stride s: each s x s patch of a finer cached map is one cell, read by a trained conv
        # that sees the shape of what lies in it (1: a per-cell projection, as always).
        self.cell_proj = nn.Sequential(
            nn.Conv2d(self.visual_channels[-1], dim, grid_stride, stride=grid_stride),
            SafeBatchNorm2d(dim),
            nn.ReLU(),
        )
        self.position = nn.Linear(4, dim) if positional else None
        self.conditioning = ConditionedCells(
            dim, self.text_dim, hidden_dim, question_norm, question_glimpses, word_attention
        )
        # No bias: a shift of the scores is lost in the softmax over cells.
        self.glimpse_score = nn.Linear(hidden_dim, glimpses, bias=False) if glimpses else None
        self.dropout = nn.Dropout(attention_dropout)
        self.glimpse_positions = glimpse_positions
        pairs = glimpses * (glimpses - 1) // 2
        position_dim = 2 * (glimpses + pairs) if glimpse_positions else 0
        self.out_dim = (1 + glimpses) * hidden_dim + dim + position_dim
        # Created last: without it the block draws its initial weights as before the option.
        self.relations = (
            RelationReadout(hidden_dim, relation_dim, hidden_dim) if relation_dim else None
        )
        if self.relations is not None:
            self.out_dim += hidden_dim
        self.context = context_layers(dim, cell_context)

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        return self.fuse(self.prepare_visual(visual), text, text_mask)

    def prepare_visual(self, visual: list[Tensor]) -> list[Tensor]:
        """Per image: the cells [U, H, W, D] and their share of the MLP's first layer
        [U, H, W, hidden] (that layer is linear in [cell, question, cell * question], so the
        cell's term is computed once per image, not once per question)."""
        cells = self.context(self.cell_proj(visual[-1])).permute(0, 2, 3, 1)
        height, width = cells.shape[1:3]
        if self.position is not None:
            boxes = grid_boxes(height, width, device=cells.device, dtype=cells.dtype)
            cells = cells + self.position(boxes).view(height, width, -1)
        return [cells, self.conditioning.cell_term(cells)]

    def fuse(self, prepared: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        cells, cell_term = prepared
        height, width = cells.shape[1:3]
        cells, cell_term = cells.flatten(1, 2), cell_term.flatten(1, 2)  # [B, M, D], [B, M, H]
        mask = text_mask.bool()
        # Zeroing padding keeps junk (even inf/nan) out of the mean.
        text = text.masked_fill(~mask.unsqueeze(-1), 0.0)
        question, question_att = self.conditioning.question_and_weights(text, mask)
        if self.conditioning.word_key is None:
            conditioned = self.conditioning(cells, cell_term, question)  # [B, M, H]
        else:
            per_cell, question_att = self.conditioning.cell_questions(cells, text, mask)
            conditioned = self.conditioning(cells, cell_term, per_cell)

        parts = [summed(conditioned), question]
        if self.glimpse_score is None:
            share = conditioned.sum(dim=-1)  # >= 0 after the ReLU: the cell's share of the sum
            image_att = share / share.sum(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            cell_weights = torch.softmax(self.glimpse_score(conditioned), dim=1)  # [B, M, G]
            glimpses = self.dropout(cell_weights).transpose(1, 2) @ conditioned  # [B, G, H]
            parts.append(glimpses.flatten(1))
            if self.glimpse_positions:
                parts.append(glimpse_centres(cell_weights, height, width))
            image_att = cell_weights.mean(dim=-1)
        if self.relations is not None:
            parts.append(self.relations(conditioned, height, width))
        return FusionOutput(
            features=torch.cat(parts, dim=-1),
            attention={
                "image": image_att.unflatten(-1, (height, width)),
                "question": question_att,
            },
        )


def glimpse_centres(cell_weights: Tensor, height: int, width: int) -> Tensor:
    """Where each glimpse looks, [B, M, G] weights over a row-major H x W grid -> [B, 2 (G + P)]:
    every glimpse's weighted cell centre (x, y), then ``centre_i - centre_j`` for each pair
    i < j (P pairs). In cells from the grid's middle, so that a few cells' offset weighs as
    much in the head's input as the summed read-out beside it (a [0, 1] scale would make a
    close call a 0.1 input). The weights are taken before dropout: the positions are exact."""
    boxes = grid_boxes(height, width, device=cell_weights.device, dtype=cell_weights.dtype)
    scale = boxes.new_tensor([width, height])
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2 - 0.5) * scale  # [M, 2], in cells
    looked = cell_weights.transpose(1, 2) @ centres  # [B, G, 2]
    pairs = combinations(range(looked.shape[1]), 2)
    offsets = [looked[:, i] - looked[:, j] for i, j in pairs]  # P x [B, 2]
    return torch.cat([looked.flatten(1), *offsets], dim=-1)
