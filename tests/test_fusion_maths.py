"""The maths of the attention blocks against hand computations on their own weights.

Parallel co-attention's two forms, written out with einsum; the spatial constraint as a prior
over cells (lowering a cell's weight never raises its attention, whatever the affinity's sign);
``keep_top_k`` against a plain ``topk`` reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from vqa.models.fusion.alternating import AlternatingCoAttention
from vqa.models.fusion.base import SUM_SCALE, FusionBlock, RelationReadout, SpatialGrid, keep_top_k
from vqa.models.fusion.cot import CoTAttention
from vqa.models.fusion.hierarchical import HierarchicalCoAttention
from vqa.models.fusion.multihead import MultiheadCoAttention
from vqa.models.fusion.parallel import ParallelCoAttention

TEXT_DIM = 16
CHANNELS = [8, 16]
GRIDS = [(6, 6), (3, 3)]
HIDDEN = 16
LENGTHS = [7, 4, 1]  # real tokens per question: full, padded, a single word


def inputs(length: int = 7) -> tuple[list[Tensor], Tensor, Tensor]:
    """Random double-precision stage maps and right-padded questions of ``LENGTHS``."""
    g = torch.Generator().manual_seed(5)
    batch = len(LENGTHS)
    visual = [
        torch.randn(batch, c, h, w, generator=g, dtype=torch.float64)
        for c, (h, w) in zip(CHANNELS, GRIDS, strict=True)
    ]
    text = torch.randn(batch, length, TEXT_DIM, generator=g, dtype=torch.float64)
    mask = torch.arange(length) < torch.tensor(LENGTHS).unsqueeze(1)
    return visual, text, mask


def linear(x: Tensor, layer: nn.Linear, pattern: str = "...d,ed->...e") -> Tensor:
    """``layer(x)`` by hand."""
    out = torch.einsum(pattern, x, layer.weight)
    return out if layer.bias is None else out + layer.bias


def masked_softmax_by_hand(logits: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    return logits.exp() / logits.exp().sum(-1, keepdim=True)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("spatial_constraint", [False, True])
@pytest.mark.parametrize("form", ["maxpool", "lu"])
def test_parallel_form_is_its_documented_formula(
    form: str, spatial_constraint: bool, residual: bool
) -> None:
    """S = W_b(Q) V^T / sqrt(D); maxpool: a_v = softmax_m(max_n S), a_q = softmax_n(max_m S)
    (no tanh); lu: C = tanh(S), a_v = softmax(w_hv(tanh(W_v(V) + C^T W_q(Q)))),
    a_q = softmax(w_hq(tanh(W_q(Q) + C W_v(V)))); the prior adds log w to the image logits."""
    torch.manual_seed(0)
    block = ParallelCoAttention(
        CHANNELS,
        TEXT_DIM,
        hidden_dim=HIDDEN,
        form=form,
        attention_dropout=0.0,
        residual=residual,
        spatial_constraint=spatial_constraint,
    )
    block = block.double().eval()
    visual, text, mask = inputs()
    with torch.no_grad():
        out = block(visual, text, mask)
        x = block.inputs(visual, text, mask)
    Q, V, prior = x.words, x.cells, x.constraint

    lu = block.attention  # W_b, W_v, W_q, w_hv, w_hq
    S = torch.einsum("bnd,ed,bme->bnm", Q, lu.affinity.weight, V) / math.sqrt(HIDDEN)
    if form == "maxpool":
        image_logits = S.masked_fill(~mask.unsqueeze(-1), -math.inf).amax(1)
        question_logits = S.amax(2)
    else:
        C = torch.tanh(S) * mask.unsqueeze(-1)
        WvV, WqQ = linear(V, lu.image_hidden), linear(Q, lu.text_hidden)
        H_v = torch.tanh(WvV + torch.einsum("bnm,bne->bme", C, WqQ))
        H_q = torch.tanh(WqQ + torch.einsum("bnm,bme->bne", C, WvV))
        image_logits = linear(H_v, lu.image_score).squeeze(-1)
        question_logits = linear(H_q, lu.text_score).squeeze(-1)
    if spatial_constraint:
        image_logits = image_logits + prior.log()
    a_v = masked_softmax_by_hand(image_logits, None)
    a_q = masked_softmax_by_hand(question_logits, mask)
    v = torch.einsum("bm,bmd->bd", a_v, V)
    q = torch.einsum("bn,bnd->bd", a_q, Q)
    if residual:
        v = v + V.mean(1)
        q = q + (Q * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    features = linear(torch.cat([v, q, v * q], -1), block.out_proj)

    torch.testing.assert_close(out.attention["image"].flatten(1), a_v, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.attention["question"], a_q, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.features, features, atol=1e-12, rtol=0)


class FixedPrior(nn.Module):
    """Stands in for the constraint MLP: preset pre-sigmoid logits per cell, whatever the box."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits.unsqueeze(-1))

    def forward(self, boxes: Tensor) -> Tensor:
        return self.logits.to(boxes.dtype)


def negate(*layers: nn.Module) -> None:
    """Flip the sign of the layers' parameters, hence of the logits or affinities they give."""
    with torch.no_grad():
        for layer in layers:
            for param in layer.parameters():
                param.neg_()


# Per block: how to build it, its constrained grids, and the layers whose sign decides the sign
# of the logits over cells. Alternating runs one step: later steps' logits read the attended
# image of earlier ones, so there the prior's effect on a cell is only direct in the first step.
PRIOR_CASES: dict[
    str,
    tuple[
        Callable[[], FusionBlock],
        Callable[[FusionBlock], list[SpatialGrid]],
        Callable[[FusionBlock], None],
    ],
] = {
    "parallel-maxpool": (
        lambda: ParallelCoAttention(CHANNELS, TEXT_DIM, HIDDEN, form="maxpool"),
        lambda b: [b.inputs.grid],
        lambda b: negate(b.attention.affinity),
    ),
    "parallel-lu": (
        lambda: ParallelCoAttention(CHANNELS, TEXT_DIM, HIDDEN, form="lu"),
        lambda b: [b.inputs.grid],
        lambda b: negate(b.attention.image_score),
    ),
    "multihead": (
        lambda: MultiheadCoAttention(CHANNELS, TEXT_DIM, HIDDEN, num_heads=4),
        lambda b: [b.inputs.grid],
        lambda b: negate(b.attention.query),
    ),
    "cot": (
        lambda: CoTAttention(CHANNELS, TEXT_DIM, HIDDEN),
        lambda b: [stage.key_grid for stage in b.stages],
        lambda b: negate(*(stage.query for stage in b.stages)),
    ),
    "hierarchical-parallel": (
        lambda: HierarchicalCoAttention(CHANNELS, TEXT_DIM, HIDDEN, mode="parallel"),
        lambda b: [b.inputs.grid],
        lambda b: negate(*(level.image_score for level in b.coattention)),
    ),
    "hierarchical-alternating": (
        lambda: HierarchicalCoAttention(CHANNELS, TEXT_DIM, HIDDEN, mode="alternating"),
        lambda b: [b.inputs.grid],
        lambda b: negate(*(level.image_steps[0].score for level in b.coattention)),
    ),
    "alternating": (
        lambda: AlternatingCoAttention(CHANNELS, TEXT_DIM, HIDDEN, steps=1),
        lambda b: [b.inputs.grid],
        lambda b: negate(*(step.score for step in b.attention.image_steps)),
    ),
}


def image_maps(block: FusionBlock, visual: list[Tensor], text: Tensor, mask: Tensor) -> list:
    with torch.no_grad():
        attention = block(visual, text, mask).attention
    return [att.flatten(1) for key, att in sorted(attention.items()) if key.startswith("image")]


@pytest.mark.parametrize("sign", [1, -1], ids=["as-built", "negated"])
@pytest.mark.parametrize("kind", list(PRIOR_CASES))
def test_lower_prior_never_raises_a_cells_attention(kind: str, sign: int) -> None:
    """The constraint is a prior over cells: with the logits of either sign, lowering one
    cell's weight w never gives that cell more attention (scaling logits by w would, where
    they are negative)."""
    make, grids_of, flip = PRIOR_CASES[kind]
    torch.manual_seed(0)
    block = make().double().eval()
    if sign < 0:
        flip(block)
    visual, text, mask = inputs()
    g = torch.Generator().manual_seed(7)
    grids = grids_of(block)
    priors = []
    for grid, (h, w) in zip(grids, GRIDS[-len(grids) :], strict=True):
        grid.constraint = FixedPrior(torch.randn(h * w, generator=g, dtype=torch.float64))
        priors.append(grid.constraint.logits)
    before = image_maps(block, visual, text, mask)
    raised = []
    for stage, logits in enumerate(priors):
        for cell in range(logits.shape[0]):
            logits[cell] -= 2.0
            after = image_maps(block, visual, text, mask)
            logits[cell] += 2.0
            # cot: stage i's prior only reaches stage i's map; single-grid blocks: every map.
            maps = [stage] if len(priors) > 1 else range(len(before))
            for index in maps:
                grown = after[index][:, cell] - before[index][:, cell]
                if (grown > 1e-12).any():
                    raised.append((stage, cell, index, float(grown.max())))
    assert not raised, f"a lower prior raised these cells' attention: {raised[:5]}"


@pytest.mark.parametrize("k", [1, 2, 4, 7, 9, 50])
def test_keep_top_k_matches_topk_with_k_clamped_to_real_keys(k: int) -> None:
    """Per row: the k largest valid logits, or every valid one where the row has fewer."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 9, generator=g)
    valid = torch.rand(4, 1, 9, generator=g) < 0.6
    valid[0] = True
    valid[1, 0, :3] = torch.tensor([True, False, False])
    valid[1, 0, 3:] = False  # a row with a single key
    keep = keep_top_k(logits, k, valid)
    for b in range(4):
        for n in range(5):
            real = valid[b, 0].nonzero().squeeze(-1)
            top = real[logits[b, n, real].topk(min(k, len(real))).indices]
            expected = torch.zeros(9, dtype=torch.bool)
            expected[top] = True
            assert torch.equal(keep[b, n], expected), (b, n)
    assert torch.equal(keep_top_k(logits, None, valid), valid.expand_as(logits))


def test_relation_readout_is_its_documented_formula() -> None:
    """z_m = W_p c_m; each cell's left/right (above/below) input is the sum of z over the cells
    in the columns (rows) strictly before/after its own; out = SUM_SCALE * sum_m ReLU(W
    [z_m, SUM_SCALE * (left_m, right_m, above_m, below_m)] + b), cell by cell with loops."""
    torch.manual_seed(0)
    readout = RelationReadout(6, 4, 5).double()
    height, width = 3, 4
    cells = torch.randn(2, height * width, 6, dtype=torch.float64)
    z = linear(cells, readout.project).view(2, height, width, 4)
    expected = torch.zeros(2, 5, dtype=torch.float64)
    for row in range(height):
        for col in range(width):
            context = [
                z[:, :, :col].sum(dim=(1, 2)),
                z[:, :, col + 1 :].sum(dim=(1, 2)),
                z[:, :row].sum(dim=(1, 2)),
                z[:, row + 1 :].sum(dim=(1, 2)),
            ]
            inputs = torch.cat([z[:, row, col], *(part * SUM_SCALE for part in context)], dim=-1)
            expected += torch.relu(linear(inputs, readout.combine))
    torch.testing.assert_close(readout(cells, height, width), expected * SUM_SCALE)
