"""Reference checks for the hierarchical, multi-head and CoT fusion blocks.

The generic contract (shapes, padding invariance, distributions, gradients, batch
independence) lives in test_fusion_contract.py; this file checks what is specific to these
blocks against independent reference computations written with plain loops.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from vqa.models.fusion.attention import GuidedAttention, attend
from vqa.models.fusion.base import FusionBlock, SpatialGrid
from vqa.models.fusion.cot import CoTAttention
from vqa.models.fusion.hierarchical import HierarchicalCoAttention
from vqa.models.fusion.multihead import MultiheadCoAttention

TEXT_DIM = 16
CHANNELS = [8, 16]
GRIDS = [(6, 6), (3, 3)]
HIDDEN = 16
LENGTHS = [7, 4, 1]  # real tokens per question: full, padded, a single word
KINDS = ["hierarchical", "hierarchical-alternating", "multihead", "cot"]


def build(kind: str, **options) -> FusionBlock:
    """A tiny block of ``kind`` in eval mode with attention dropout off (deterministic)."""
    options.setdefault("attention_dropout", 0.0)
    if kind == "multihead":
        options.setdefault("num_heads", 4)
        block = MultiheadCoAttention(CHANNELS, TEXT_DIM, hidden_dim=HIDDEN, **options)
    elif kind.startswith("hierarchical"):
        options.setdefault("mode", "alternating" if kind.endswith("alternating") else "parallel")
        block = HierarchicalCoAttention(CHANNELS, TEXT_DIM, hidden_dim=HIDDEN, **options)
    else:
        block = CoTAttention(CHANNELS, TEXT_DIM, hidden_dim=HIDDEN, **options)
    return block.eval()


def same_weights(kind: str, reference: FusionBlock, **options) -> FusionBlock:
    """A block with other options but ``reference``'s parameters and buffers."""
    block = build(kind, **options)
    block.load_state_dict(reference.state_dict())
    return block


def inputs(
    lengths: list[int] = LENGTHS, grids: list[tuple[int, int]] = GRIDS, length: int = 7
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Random encoder features and right-padded questions of the given real lengths."""
    g = torch.Generator().manual_seed(1)
    batch = len(lengths)
    visual = [
        torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(CHANNELS, grids, strict=True)
    ]
    text = torch.randn(batch, length, TEXT_DIM, generator=g)
    mask = torch.arange(length) < torch.tensor(lengths).unsqueeze(1)
    return visual, text, mask


def restricted_to_top_k(dense: Tensor, k: int) -> Tensor:
    """What a k-sparse softmax must give: the dense distribution on its k largest entries,
    renormalised (softmax is monotone, so the largest weights are the largest logits)."""
    keep = torch.zeros_like(dense, dtype=torch.bool).scatter(-1, dense.topk(k, -1).indices, True)
    kept = dense * keep
    return kept / kept.sum(-1, keepdim=True)


def assert_top_k_of(sparse: Tensor, dense: Tensor, k: int) -> None:
    sparse, dense = sparse.flatten(1), dense.flatten(1)
    assert ((sparse > 0).sum(-1) == k).all()
    torch.testing.assert_close(sparse, restricted_to_top_k(dense, k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_at_least_keys_equals_dense(kind: str) -> None:
    visual, text, mask = inputs()
    dense = build(kind, top_k=None, spatial_constraint=True)
    # 36 = the most keys any softmax has here (6x6 cells); also >= the 7 tokens
    sparse = same_weights(kind, dense, top_k=36, spatial_constraint=True)
    with torch.no_grad():
        expected, actual = dense(visual, text, mask), sparse(visual, text, mask)
    assert torch.equal(expected.features, actual.features)
    assert expected.attention.keys() == actual.attention.keys()
    for name, weights in expected.attention.items():
        assert torch.equal(weights, actual.attention[name]), name


def test_hierarchical_small_top_k_keeps_only_largest() -> None:
    # Parallel co-attention: each level's image and question attention is one softmax row.
    visual, text, mask = inputs()
    dense = build("hierarchical")
    sparse = same_weights("hierarchical", dense, top_k=2)
    with torch.no_grad():
        expected, actual = dense(visual, text, mask), sparse(visual, text, mask)
    for level in ("word", "phrase", "sentence"):
        assert_top_k_of(actual.attention[f"image/{level}"], expected.attention[f"image/{level}"], 2)
        question = f"question/{level}"
        # the one-word question keeps its single word
        assert_top_k_of(actual.attention[question][:2], expected.attention[question][:2], 2)
        assert torch.equal(actual.attention[question][2], mask[2].float())


def test_alternating_step_small_top_k_keeps_only_largest() -> None:
    torch.manual_seed(0)
    step = GuidedAttention(HIDDEN, bias=False)  # a step of hierarchical's alternating levels
    cells, guide = torch.randn(2, 9, HIDDEN), torch.randn(2, HIDDEN)
    with torch.no_grad():
        logits = step(cells, guide)
        assert_top_k_of(attend(logits, None, top_k=3), attend(logits, None, top_k=None), 3)


@pytest.mark.parametrize("kind", ["multihead", "cot"])
def test_small_top_k_keeps_only_largest_per_query(kind: str) -> None:
    # One real word -> the image map is that word's row; 1x1 grids -> the question map is
    # the single cell's row. One head, so the map is not a mix of several heads' supports.
    options = {"num_heads": 1} if kind == "multihead" else {}
    dense = build(kind, **options)
    sparse = same_weights(kind, dense, top_k=2, **options)
    with torch.no_grad():
        one_word = inputs(lengths=[1, 1])
        expected, actual = dense(*one_word), sparse(*one_word)
        for name in expected.attention:
            if name.startswith("image"):
                assert_top_k_of(actual.attention[name], expected.attention[name], 2)
        one_cell = inputs(lengths=[7, 5], grids=[(1, 1), (1, 1)])
        expected, actual = dense(*one_cell), sparse(*one_cell)
        for name in expected.attention:
            if name.startswith("question"):
                assert_top_k_of(actual.attention[name], expected.attention[name], 2)


def sparse_softmax(logits: Tensor, k: int | None) -> Tensor:
    """Row-wise softmax over the k largest logits only (reference, via topk + scatter)."""
    k = logits.shape[-1] if k is None else min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))


def reference_multihead(
    block: MultiheadCoAttention, visual: list[Tensor], text: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample, per-head loop with padding dropped (not masked), using the block's weights."""
    cells_all, constraint = block.inputs.grid(visual[-1])
    words_all = block.inputs.text_proj(text)
    attention = block.attention
    d, k, heads = attention.head_dim, block.top_k, attention.num_heads
    features, image_maps, question_maps = [], [], []
    for b in range(text.shape[0]):
        cells, words = cells_all[b], words_all[b][mask[b]]  # real words only
        heads_v, heads_q, image_att, question_att = (
            [],
            [],
            0.0,
            torch.zeros_like(mask[b], dtype=text.dtype),
        )
        for h in range(heads):
            rows = slice(h * d, (h + 1) * d)
            q = F.linear(words, attention.query.weight[rows], attention.query.bias[rows])
            key = F.linear(cells, attention.key.weight[rows], attention.key.bias[rows])
            affinity = q @ key.T / math.sqrt(d)
            # The spatial prior w enters each word's softmax over cells as + log w.
            prior = 0.0 if constraint is None else constraint.log()
            per_word = sparse_softmax(affinity + prior, k)  # [n, M]
            a_q = sparse_softmax(affinity.T, k).mean(0)  # [n]
            a_v = a_q @ per_word  # [M]
            heads_v.append(a_v @ cells[:, rows])
            heads_q.append(a_q @ words[:, rows])
            image_att = image_att + a_v / heads
            question_att[mask[b]] += a_q / heads
        v, q = torch.cat(heads_v), torch.cat(heads_q)
        if block.residual:
            v, q = v + cells.mean(0), q + words.mean(0)
        features.append(block.out_proj(torch.cat([v, q, v * q])))
        image_maps.append(image_att)
        question_maps.append(question_att)
    return torch.stack(features), torch.stack(image_maps), torch.stack(question_maps)


@pytest.mark.parametrize(
    "options",
    [{}, {"top_k": 2, "spatial_constraint": True}, {"residual": False, "positional": False}],
    ids=["dense", "top2-constraint", "plain"],
)
def test_multihead_matches_per_head_loop(options: dict) -> None:
    block = build("multihead", **options).double()
    visual, text, mask = inputs()
    visual, text = [v.double() for v in visual], text.double()
    with torch.no_grad():
        out = block(visual, text, mask)
        features, image_att, question_att = reference_multihead(block, visual, text, mask)
    torch.testing.assert_close(out.features, features, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.attention["image"].flatten(1), image_att, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.attention["question"], question_att, atol=1e-6, rtol=0)


def reference_phrases(block: HierarchicalCoAttention, words: Tensor) -> Tensor:
    """Lu et al.'s n-gram phrases of one unpadded question [L, D], by explicit windows."""
    length = words.shape[0]
    per_width = []
    for conv in block.ngrams:
        width = conv.kernel_size[0]
        out = torch.stack(
            [
                conv.bias
                + sum(conv.weight[:, :, j] @ words[t + j] for j in range(width) if t + j < length)
                for t in range(length)
            ]
        )
        per_width.append(torch.tanh(out))
    return torch.stack(per_width).amax(0)


def test_hierarchical_phrase_convs_ignore_padding() -> None:
    block = build("hierarchical")
    g = torch.Generator().manual_seed(2)
    words = torch.randn(3, 7, HIDDEN, generator=g)
    mask = torch.arange(7) < torch.tensor(LENGTHS).unsqueeze(1)
    # junk in padded positions and four more padded positions
    junk = torch.cat([words, torch.randn(3, 4, HIDDEN, generator=g)], 1) * 1e3
    junk[:, :7][mask] = words[mask]
    junk_mask = F.pad(mask, (0, 4), value=False)
    with torch.no_grad():
        phrases, phrases_junk = block._phrases(words, mask), block._phrases(junk, junk_mask)
        for b, length in enumerate(LENGTHS):
            expected = reference_phrases(block, words[b, :length])
            torch.testing.assert_close(phrases[b, :length], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(phrases_junk[:, :7], phrases, atol=1e-6, rtol=0)
    assert not phrases_junk[~junk_mask].any()


@pytest.mark.parametrize("side", ["right", "left"])
def test_hierarchical_sentence_lstm_reads_real_phrases_only(side: str) -> None:
    block = build("hierarchical")
    g = torch.Generator().manual_seed(4)
    phrases = torch.randn(3, 7, HIDDEN, generator=g)
    mask = torch.arange(7) < torch.tensor(LENGTHS).unsqueeze(1)
    if side == "left":  # the real words at the end instead
        shifts = [7 - n for n in LENGTHS]
        phrases = torch.stack([p.roll(s, 0) for p, s in zip(phrases, shifts, strict=True)])
        mask = torch.stack([m.roll(s, 0) for m, s in zip(mask, shifts, strict=True)])
    with torch.no_grad():
        states = block._sentence(phrases, mask)
        for b in range(3):
            expected = block.sentence_rnn(phrases[b][mask[b]].unsqueeze(0))[0][0]
            torch.testing.assert_close(states[b][mask[b]], expected, atol=1e-6, rtol=0)
    assert not states[~mask].any()


def test_cot_uses_every_stage() -> None:
    channels, grids = [8, 16, 16], [(6, 6), (3, 3), (2, 2)]
    block = CoTAttention(channels, TEXT_DIM, hidden_dim=HIDDEN, attention_dropout=0.0).eval()
    g = torch.Generator().manual_seed(3)
    visual = [
        torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(channels, grids, strict=True)
    ]
    text, mask = (
        torch.randn(2, 5, TEXT_DIM, generator=g),
        torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]).bool(),
    )
    out = block(visual, text, mask)
    assert block.out_dim == HIDDEN and out.features.shape == (2, HIDDEN)
    assert block.out_proj.in_features == len(channels) * 3 * HIDDEN  # [v, q, v*q] per stage
    for index, (h, w) in enumerate(grids):
        assert out.attention[f"image/stage{index}"].shape == (2, h, w)
        assert out.attention[f"question/stage{index}"].shape == (2, 5)
    out.features.square().sum().backward()
    for index, stage in enumerate(block.stages):
        for part in (stage.key, stage.value, stage.key_grid, stage.query):
            grads = [p.grad for p in part.parameters()]
            assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), index
    with pytest.raises(ValueError, match="3 visual stages"):
        block(visual[:2], text, mask)


def test_cot_attention_is_scaled_dot_product_over_keys() -> None:
    block = build("cot")
    visual, text, mask = inputs(lengths=[1, 1])  # one word: the image map is its softmax row
    with torch.no_grad():
        out = block(visual, text, mask)
        for index, (stage, feature_map) in enumerate(zip(block.stages, visual, strict=True)):
            keys, _ = stage.key_grid(stage.key(feature_map))
            query = stage.query(text[:, 0])  # [B, D]
            logits = torch.einsum("bd,bmd->bm", query, keys) / math.sqrt(HIDDEN)
            torch.testing.assert_close(
                out.attention[f"image/stage{index}"].flatten(1),
                logits.softmax(-1),
                atol=1e-6,
                rtol=0,
            )


@pytest.mark.parametrize(("norm", "coupled"), [("batch", True), ("group", False)])
def test_cot_batch_coupling_in_train_mode(norm: str, coupled: bool) -> None:
    """BatchNorm couples samples in train mode (documented); GroupNorm and eval mode do not."""
    block = build("cot", norm=norm).train()
    visual, text, mask = inputs()
    other = [v.clone() for v in visual]
    for v in other:
        v[1:] = v[1:] * 3 + 1  # change every sample but the first
    with torch.no_grad():
        first, changed = block(visual, text, mask).features[0], block(other, text, mask).features[0]
        assert (not torch.allclose(first, changed, atol=1e-5)) == coupled
        block.eval()
        first, changed = block(visual, text, mask).features[0], block(other, text, mask).features[0]
        torch.testing.assert_close(first, changed, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("multihead", {"num_heads": 3}, "num_heads"),
        ("cot", {"groups": 3}, "groups"),
        ("cot", {"norm": "layer"}, "norm"),
        ("hierarchical", {"mode": "serial"}, "mode"),
    ],
)
def test_bad_options_fail_at_construction(kind: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(kind, **options)


def test_grid_norm_removes_what_every_cell_shares_per_channel() -> None:
    """Un-normalised maps (a frozen random encoder's ReLU outputs) carry a large per-channel
    offset shared by every cell; ``grid_norm: batch`` hands the attention only what tells the
    cells apart, so adding such an offset changes no token. Without it, every token changes."""
    g = torch.Generator().manual_seed(0)
    feature_map = torch.randn(4, 6, 3, 3, generator=g)
    offset = 10 * torch.randn(1, 6, 1, 1, generator=g)
    for norm, invariant in (("batch", True), ("none", False)):
        torch.manual_seed(0)
        grid = SpatialGrid(6, 8, norm=norm).train()
        with torch.no_grad():
            plain, _ = grid(feature_map)
            shifted, _ = grid(feature_map + offset)
        assert torch.allclose(plain, shifted, atol=1e-4) == invariant, norm
    with pytest.raises(ValueError, match="grid_norm"):
        SpatialGrid(6, 8, norm="layer")
