"""The options the co-attention blocks share: ``grid_stride``, ``cell_conditioning`` and
``count`` (``SingleStageFusion``, and cot's own over several stages). The generic contract with
these options on is checked in test_fusion_contract.py; this file checks what each option
promises."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from vqa.models.fusion.alternating import AlternatingCoAttention
from vqa.models.fusion.base import SUM_SCALE, SingleStageFusion
from vqa.models.fusion.cot import CoTAttention
from vqa.models.fusion.early import EarlyFusion
from vqa.models.fusion.film import FiLMFusion
from vqa.models.fusion.hierarchical import HierarchicalCoAttention
from vqa.models.fusion.multihead import MultiheadCoAttention
from vqa.models.fusion.parallel import ParallelCoAttention

CHANNELS = [12]
TEXT_DIM = 16
HIDDEN = 16
BLOCKS = {
    "parallel": ParallelCoAttention,
    "alternating": AlternatingCoAttention,
    "multihead": lambda *a, **k: MultiheadCoAttention(*a, num_heads=4, **k),
}


def build(kind: str, seed: int = 0, **options) -> SingleStageFusion:
    torch.manual_seed(seed)
    options.setdefault("attention_dropout", 0.0)
    return BLOCKS[kind](CHANNELS, TEXT_DIM, hidden_dim=HIDDEN, **options).eval()


def questions(batch: int, length: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    text = torch.randn(batch, length, TEXT_DIM, generator=g)
    mask = torch.arange(length) < torch.randint(1, length + 1, (batch, 1), generator=g)
    return text, mask


def images(count: int, height: int = 8, width: int = 8) -> list[Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(count, CHANNELS[0], height, width, generator=g)]


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("stride", [1, 2, 4])
def test_grid_stride_reads_patches_into_a_coarser_grid(kind: str, stride: int) -> None:
    block = build(kind, grid_stride=stride)
    text, mask = questions(2)
    out = block(images(2), text, mask)
    assert out.attention["image"].shape == (2, 8 // stride, 8 // stride)
    if stride > 1:
        # A change inside one patch moves only that cell's token.
        visual = images(2)
        tokens = block.inputs.cells(visual)
        visual[0][0, :, :stride, :stride] += 5.0
        moved = (block.inputs.cells(visual) - tokens).abs().amax(-1) > 1e-6
        assert moved[0, 0, 0] and moved.sum() == 1


# The other blocks that read the last stage as a grid take ``grid_stride`` too (the quick-start
# presets set it for every block that has it).
OTHER_GRID_BLOCKS = {
    "film": FiLMFusion,
    "hierarchical": HierarchicalCoAttention,
    "early": EarlyFusion,
}


@pytest.mark.parametrize("kind", OTHER_GRID_BLOCKS)
def test_other_blocks_read_patches_with_grid_stride(kind: str) -> None:
    torch.manual_seed(0)
    block = OTHER_GRID_BLOCKS[kind](CHANNELS, TEXT_DIM, hidden_dim=HIDDEN, grid_stride=2).eval()
    text, mask = questions(2)
    out = block(images(2), text, mask)
    assert all(m.shape == (2, 4, 4) for key, m in out.attention.items() if key.startswith("image"))

    visual = images(2)
    before = grid_cells(kind, block, visual)
    visual[0][0, :, :2, :2] += 5.0
    moved = (grid_cells(kind, block, visual) - before).abs().amax(-1) > 1e-6
    assert moved.shape == (2, 4, 4) and moved[0, 0, 0] and moved.sum() == 1


def grid_cells(kind: str, block: nn.Module, visual: list[Tensor]) -> Tensor:
    """The block's per-image cells [U, H, W, D], before any question."""
    return block.prepare_visual(visual)[0] if kind == "film" else block.inputs.cells(visual)


GRID_BLOCKS = {**BLOCKS, **OTHER_GRID_BLOCKS}
GRID_BLOCKS.pop("early")  # no cell_context: it pools the grid, it has no cells to widen


@pytest.mark.parametrize("kind", GRID_BLOCKS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_cell_context_widens_what_a_cell_sees_by_one_cell_per_layer(
    kind: str, stride: int, layers: int
) -> None:
    """A change inside the cell at (row 3, col 3) moves that cell alone without context, and
    with n layers of it every cell up to n cells away (rows and columns 3 - n .. 3 + n), not
    one further: each layer is a 3 x 3 neighbourhood of cells, whatever the patch size."""
    torch.manual_seed(0)
    block = GRID_BLOCKS[kind](
        CHANNELS, TEXT_DIM, hidden_dim=HIDDEN, grid_stride=stride, cell_context=layers
    ).eval()
    visual = images(1, 8 * stride, 8 * stride)
    before = grid_cells(kind, block, visual)
    visual[0][0, :, 3 * stride : 4 * stride, 3 * stride : 4 * stride] += 5.0
    moved = (grid_cells(kind, block, visual) - before).abs().amax(-1)[0] > 1e-6
    near = torch.zeros(8, 8, dtype=torch.bool)
    near[3 - layers : 4 + layers, 3 - layers : 4 + layers] = True
    assert torch.equal(moved, near)


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize(
    "options",
    [{}, {"cell_conditioning": True, "count": True}, {"grid_stride": 2, "cell_conditioning": True}],
)
def test_prepared_once_per_image_equals_per_question(kind: str, options: dict) -> None:
    """VQAModel prepares each distinct image once and repeats it per question: the result must
    be what the block computes from the image repeated per question."""
    check_prepared_once_per_image(build(kind, **options), images(3))


def check_prepared_once_per_image(block: nn.Module, visual: list[Tensor]) -> None:
    """``fuse`` on ``prepare_visual``'s rows repeated per question == the block on the images
    repeated per question (questions 0-5 ask about images 0, 0, 2, 1, 2, 2)."""
    index = torch.tensor([0, 0, 2, 1, 2, 2])
    text, mask = questions(len(index))
    prepared = [part.index_select(0, index) for part in block.prepare_visual(visual)]
    grouped = block.fuse(prepared, text, mask)
    repeated = block([stage.index_select(0, index) for stage in visual], text, mask)
    torch.testing.assert_close(grouped.features, repeated.features, rtol=0, atol=1e-5)
    for key, att in repeated.attention.items():
        torch.testing.assert_close(grouped.attention[key], att, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", BLOCKS)
def test_count_is_unnormalised_and_attention_is_not(kind: str) -> None:
    """Without box embeddings, the same map tiled twice side by side holds every object twice:
    the count read-out doubles exactly, the softmax-pooled part does not move."""
    block = build(kind, cell_conditioning=True, count=True, positional=False, residual=False)
    visual = images(2)
    tiled = [torch.cat([visual[0], visual[0]], dim=-1)]
    text, mask = questions(2)
    once, twice = block(visual, text, mask).features, block(tiled, text, mask).features
    attended, counted = once.split(HIDDEN, dim=-1), twice.split(HIDDEN, dim=-1)
    torch.testing.assert_close(counted[1], 2 * attended[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(counted[0], attended[0], rtol=1e-4, atol=1e-5)
    assert block.out_dim == 2 * HIDDEN
    # The read-out is the conditioned cells' scaled sum: non-negative, zero only if all are.
    assert (counted[1] >= 0).all() and counted[1].abs().sum() > 0
    assert SUM_SCALE < 1


@pytest.mark.parametrize("kind", BLOCKS)
def test_conditioned_cells_depend_on_the_question(kind: str) -> None:
    """With conditioning the cells the attention reads change with the question (centred
    across the batch in train mode); without, they are the image's alone."""
    visual = images(1)
    text, mask = questions(4)
    for conditioned in (False, True):
        block = build(kind, cell_conditioning=conditioned).train()
        prepared = [part.expand(4, *part.shape[1:]) for part in block.prepare_visual(visual)]
        x = block.inputs.words(prepared[0], text, mask)
        cells = x.cells
        if conditioned:
            question = block.conditioning.pooled_question(x.words, x.mask)
            cells = block.conditioning(cells, prepared[1].flatten(1, 2), question)
        spread = (cells - cells[:1]).abs().amax()
        assert (spread > 1e-3) == conditioned


def test_count_needs_conditioning() -> None:
    with pytest.raises(ValueError, match="cell_conditioning"):
        build("parallel", count=True)


@pytest.mark.parametrize("stride", [0, -1])
def test_grid_stride_must_be_positive(stride: int) -> None:
    with pytest.raises(ValueError, match="grid_stride"):
        build("parallel", grid_stride=stride)


def test_default_options_leave_the_parameters_unchanged() -> None:
    """Off, the options add no parameter: a default block's state dict keeps its keys."""
    keys = set(build("parallel").state_dict())
    assert not any(k.startswith("conditioning.") for k in keys)
    assert not any(".context." in k for k in keys)
    assert "inputs.grid.proj.weight" in keys


# cot attends over every listed stage and prepares its keys and values per stage; the same
# options, on two stages.
COT_CHANNELS = [12, 8]


def build_cot(seed: int = 0, **options) -> CoTAttention:
    torch.manual_seed(seed)
    options.setdefault("attention_dropout", 0.0)
    return CoTAttention(COT_CHANNELS, TEXT_DIM, hidden_dim=HIDDEN, **options).eval()


def cot_images(count: int, size: int = 8) -> list[Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(count, c, size, size, generator=g) for c in COT_CHANNELS]


def test_cot_grid_stride_reads_patches_into_a_coarser_grid() -> None:
    block = build_cot(grid_stride=2)
    text, mask = questions(2)
    out = block(cot_images(2), text, mask)
    assert out.attention["image/stage0"].shape == out.attention["image/stage1"].shape == (2, 4, 4)
    # A change inside one patch of stage 0 moves that cell's value only (the keys' 3x3
    # convolution also reads the neighbours), and nothing of stage 1.
    visual = cot_images(2)
    before = block.prepare_visual(visual)
    visual[0][0, :, :2, :2] += 5.0
    after = block.prepare_visual(visual)
    moved = (after[1] - before[1]).abs().amax(-1) > 1e-6
    assert moved.shape == (2, 4, 4) and moved[0, 0, 0] and moved.sum() == 1
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])


@pytest.mark.parametrize(
    "options", [{}, {"grid_stride": 2, "cell_conditioning": True, "count": True}]
)
def test_cot_prepared_once_per_image_equals_per_question(options: dict) -> None:
    check_prepared_once_per_image(build_cot(**options), cot_images(3))


def test_cot_count_sums_each_stage_unnormalised() -> None:
    """Every object twice (the maps tiled side by side, no box embeddings): each stage's count
    read-out doubles exactly; the values are 1x1 convolutions, so the tiling cannot blur them."""
    block = build_cot(cell_conditioning=True, count=True, positional=False, residual=False)
    visual = cot_images(2)
    tiled = [torch.cat([stage, stage], dim=-1) for stage in visual]
    text, mask = questions(2)
    once, twice = block(visual, text, mask).features, block(tiled, text, mask).features
    assert block.out_dim == once.shape[-1] == 3 * HIDDEN
    counts_once, counts_twice = once[:, HIDDEN:], twice[:, HIDDEN:]
    torch.testing.assert_close(counts_twice, 2 * counts_once, rtol=1e-5, atol=1e-6)
    assert (counts_once >= 0).all() and counts_once[:, :HIDDEN].abs().sum() > 0
    assert counts_once[:, HIDDEN:].abs().sum() > 0


def test_cot_conditioned_values_depend_on_the_question() -> None:
    visual = cot_images(1)
    text, mask = questions(4)
    for conditioned in (False, True):
        block = build_cot(cell_conditioning=conditioned).train()
        prepared = [part.expand(4, *part.shape[1:]) for part in block.prepare_visual(visual)]
        per_stage = len(prepared) // 2
        _, values, _, _ = block.stages[0](prepared[:per_stage], text, mask.bool())
        spread = (values - values[:1]).abs().amax()
        assert (spread > 1e-3) == conditioned


def test_cot_options_checked_and_off_by_default() -> None:
    with pytest.raises(ValueError, match="cell_conditioning"):
        build_cot(count=True)
    with pytest.raises(ValueError, match="grid_stride"):
        build_cot(grid_stride=0)
    block = build_cot()
    assert block.out_dim == HIDDEN
    assert not any(".patch." in k or ".conditioning." in k for k in block.state_dict())


@pytest.mark.parametrize("positional", [True, False])
def test_cot_conditioned_values_know_where_they_are(positional: bool) -> None:
    """The same feature in every cell: the conditioned values (summed by ``count``) still tell
    the cells apart by their box embedding, as the single-stage blocks' cells do; without box
    embeddings they are all one."""
    block = build_cot(cell_conditioning=True, count=True, positional=positional)
    visual = [torch.ones(1, c, 4, 4) for c in COT_CHANNELS]
    text, mask = questions(1)
    _, values, _, _ = block.stages[0](block.prepare_visual(visual)[:3], text, mask.bool())
    assert ((values - values[:, :1]).abs().amax() > 1e-4) == positional
