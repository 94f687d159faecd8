"""The fusion contract, checked on every `configs/fusion/*.yaml` (a new block needs no edit here).

Shapes and ``out_dim``; padding never changes anything; attention maps are distributions with
exactly zero weight on padding; every parameter learns; samples do not leak into each other;
the optional knobs (top_k, residual, spatial_constraint, positional) keep all of the above;
a training batch of a single question neither crashes nor goes non-finite.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import Tensor

from vqa.models.fusion.base import FusionBlock, FusionOutput

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
FUSION_CONFIGS = sorted((CONFIG_DIR / "fusion").glob("*.yaml"))
NAMES = [p.stem for p in FUSION_CONFIGS]
CHANNELS = [8, 16]
GRIDS = [(6, 6), (3, 3)]
TEXT_DIM = 16
HIDDEN = 16
LENGTHS = [5, 3, 1]  # a full question, a padded one, a single real token
ATOL = 1e-5
# Blocks whose output is invariant to permuting grid cells once box embeddings are off
# (attention pooling is permutation-equivariant); convolutional blocks are not.
CELL_PERMUTATION_INVARIANT = {"early", "parallel", "alternating"}
# Block-specific forms checked against the full contract on top of the yaml defaults.
CONDITIONED = {"cell_conditioning": True, "count": True}
VARIANTS = {
    "parallel": [{"form": "lu"}, CONDITIONED, {**CONDITIONED, "cell_context": 1}],
    "early": [{"op": "sum"}],
    "alternating": [{"steps": 1}, {"steps": 3}, CONDITIONED],
    "multihead": [CONDITIONED],
    "hierarchical": [CONDITIONED, {"cell_context": 1}],
    "cot": [CONDITIONED],
    "film": [
        {"glimpses": 2},
        {"question_glimpses": 2},
        {"glimpses": 3, "glimpse_positions": True},
        {"relation_dim": 8},
        {"word_attention": True},
        {"cell_context": 2},
    ],
}


def signature(path: Path) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(get_class(OmegaConf.load(path)._target_)).parameters)


def build(path: Path, seed: int = 0, **overrides: Any) -> FusionBlock:
    cfg = OmegaConf.load(path)
    cfg.hidden_dim = HIDDEN
    for key, value in overrides.items():
        cfg[key] = value
    torch.manual_seed(seed)
    block = instantiate(cfg)(visual_channels=CHANNELS, text_dim=TEXT_DIM)
    return block.eval()


def inputs(seed: int = 0) -> tuple[list[Tensor], Tensor, Tensor]:
    """Two stages, a text batch with padding that holds loud junk."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(LENGTHS), max(LENGTHS)
    visual = [
        torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(CHANNELS, GRIDS, strict=True)
    ]
    mask = torch.arange(length) < torch.tensor(LENGTHS).unsqueeze(1)
    text = torch.randn(batch, length, TEXT_DIM, generator=g)
    text = torch.where(mask.unsqueeze(-1), text, 1e3 * torch.randn(text.shape, generator=g))
    return visual, text, mask


def with_more_padding(text: Tensor, mask: Tensor, extra: int = 4) -> tuple[Tensor, Tensor]:
    """Fresh junk in every padded slot plus ``extra`` more padded positions."""
    g = torch.Generator().manual_seed(123)
    junk = 1e3 * torch.randn(text.shape[0], text.shape[1] + extra, text.shape[2], generator=g)
    longer = torch.cat([text, junk[:, text.shape[1] :]], dim=1)
    longer_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    longer[:, : text.shape[1]] = torch.where(mask.unsqueeze(-1), text, junk[:, : text.shape[1]])
    return longer, longer_mask


def check_maps(out: FusionOutput, mask: Tensor, grids: Sequence[tuple[int, int]] = GRIDS) -> None:
    """Image maps sum to 1 over a stage's grid; question maps over real tokens, 0 on padding."""
    assert out.attention, "a fusion block must expose its attention maps"
    for key, att in out.attention.items():
        assert torch.isfinite(att).all(), key
        assert (att >= 0).all(), key
        if key.startswith("image"):
            assert att.shape[0] == mask.shape[0] and tuple(att.shape[1:]) in grids, key
            torch.testing.assert_close(
                att.sum(dim=(1, 2)), torch.ones(att.shape[0]), atol=ATOL, rtol=0
            )
        else:
            assert key.startswith("question"), (
                f"attention key {key!r} is neither image* nor question*"
            )
            assert att.shape == mask.shape, key
            torch.testing.assert_close(att.sum(dim=1), torch.ones(att.shape[0]), atol=ATOL, rtol=0)
            assert (att[~mask] == 0).all(), f"{key} puts weight on padding"


def check_contract(block: FusionBlock) -> None:
    """Maps are distributions and extra/junk padding changes neither features nor maps."""
    visual, text, mask = inputs()
    with torch.no_grad():
        out = block(visual, text, mask)
        padded_text, padded_mask = with_more_padding(text, mask)
        padded = block(visual, padded_text, padded_mask)
    assert out.features.shape == (len(LENGTHS), block.out_dim)
    assert torch.isfinite(out.features).all()
    check_maps(out, mask)
    check_maps(padded, padded_mask)
    torch.testing.assert_close(padded.features, out.features, atol=ATOL, rtol=0)
    assert padded.attention.keys() == out.attention.keys()
    for key, att in out.attention.items():
        other = padded.attention[key]
        if key.startswith("question"):
            other = other[:, : mask.shape[1]]
        torch.testing.assert_close(other, att, atol=ATOL, rtol=0)
    check_prepared_path(block, visual, text, mask)


def check_prepared_path(
    block: FusionBlock, visual: list[Tensor], text: Tensor, mask: Tensor
) -> None:
    """VQAModel's path (prepare each distinct image once, repeat per question, fuse) gives what
    ``forward`` gives on the repeated images: prepare_visual does no per-question work."""
    image_index = torch.arange(len(LENGTHS)) // 2  # questions 2i and 2i+1 share image i
    distinct = [stage[: int(image_index.max()) + 1] for stage in visual]
    with torch.no_grad():
        direct = block([stage[image_index] for stage in distinct], text, mask)
        prepared = [part[image_index] for part in block.prepare_visual(distinct)]
        split = block.fuse(prepared, text, mask)
    torch.testing.assert_close(split.features, direct.features, atol=ATOL, rtol=1e-5)
    for key, att in direct.attention.items():
        torch.testing.assert_close(split.attention[key], att, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("path", FUSION_CONFIGS, ids=NAMES)
def test_yaml_exposes_hidden_dim_and_partial(path: Path) -> None:
    cfg = OmegaConf.load(path)
    assert cfg._partial_ is True
    assert "hidden_dim" in cfg
    assert cfg._target_.startswith("vqa.models.fusion.")
    assert issubclass(get_class(cfg._target_), FusionBlock)


@pytest.mark.parametrize("path", FUSION_CONFIGS, ids=NAMES)
def test_default_block_honours_contract(path: Path) -> None:
    block = build(path)
    assert isinstance(block, FusionBlock)
    check_contract(block)


VARIANT_CASES = [
    (path, variant) for path in FUSION_CONFIGS for variant in VARIANTS.get(path.stem, [])
]


@pytest.mark.parametrize(
    ("path", "variant"), VARIANT_CASES, ids=[f"{p.stem}-{v}" for p, v in VARIANT_CASES]
)
def test_block_variants_honour_contract(path: Path, variant: dict[str, Any]) -> None:
    check_contract(build(path, **variant))


def option_cases() -> list[tuple[Path, str, Any]]:
    """(yaml, option, non-default value) for each optional knob a block's signature has."""
    cases = []
    for path in FUSION_CONFIGS:
        params = signature(path)
        defaults = OmegaConf.load(path)
        for option in ("residual", "spatial_constraint", "positional"):
            if option in params:
                cases.append((path, option, not defaults.get(option, params[option].default)))
        if "top_k" in params:
            cases.append((path, "top_k", 1))
            cases.append((path, "top_k", 3))
        if "grid_norm" in params:
            cases.append((path, "grid_norm", "none"))
    return cases


OPTION_CASES = option_cases()


@pytest.mark.parametrize(
    ("path", "option", "value"),
    OPTION_CASES,
    ids=[f"{p.stem}-{o}={v}" for p, o, v in OPTION_CASES],
)
def test_options_keep_contract(path: Path, option: str, value: Any) -> None:
    check_contract(build(path, **{option: value}))


TOP_K_CONFIGS = [p for p in FUSION_CONFIGS if "top_k" in signature(p)]


@pytest.mark.parametrize("path", TOP_K_CONFIGS, ids=[p.stem for p in TOP_K_CONFIGS])
def test_top_k_at_least_keys_equals_dense(path: Path) -> None:
    visual, text, mask = inputs()
    with torch.no_grad():
        dense = build(path, top_k=None)(visual, text, mask)
        sparse_all = build(path, top_k=10_000)(visual, text, mask)
        sparse = build(path, top_k=1)(visual, text, mask)
    torch.testing.assert_close(sparse_all.features, dense.features, atol=ATOL, rtol=0)
    # And the knob does something when it does bite.
    assert not torch.allclose(sparse.features, dense.features, atol=1e-3)


def backward_random_projection(out: FusionOutput) -> None:
    # Random projections, not plain sums: a sum through a normalisation has zero gradient.
    g = torch.Generator().manual_seed(1)
    loss = (out.features * torch.randn(out.features.shape, generator=g)).sum()
    for att in out.attention.values():
        loss = loss + (att * torch.randn(att.shape, generator=g)).sum()
    loss.backward()


def check_input_gradients(visual: list[Tensor], text: Tensor, mask: Tensor) -> None:
    # Single-scale blocks read the last stage only; every block reads that one.
    assert visual[-1].grad is not None and visual[-1].grad.abs().sum() > 0
    assert (text.grad[~mask] == 0).all(), "gradient flows into padding"
    assert text.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("path", FUSION_CONFIGS, ids=NAMES)
def test_gradients_reach_every_parameter(path: Path) -> None:
    options = {"spatial_constraint": True} if "spatial_constraint" in signature(path) else {}
    block = build(path, **options).train()
    visual, text, mask = inputs()
    visual = [v.requires_grad_() for v in visual]
    text.requires_grad_()
    out = block(visual, text, mask)
    backward_random_projection(out)
    for name, param in block.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} gets no gradient"
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
            assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    check_input_gradients(visual, text, mask)


SINGLE_CASES = [(path, {}) for path in FUSION_CONFIGS] + VARIANT_CASES


@pytest.mark.parametrize(
    ("path", "variant"),
    SINGLE_CASES,
    ids=[p.stem + (f"-{v}" if v else "") for p, v in SINGLE_CASES],
)
@pytest.mark.parametrize("grid", ["grid", "1x1"])
def test_training_batch_of_one_question(path: Path, variant: dict[str, Any], grid: str) -> None:
    """The train loader keeps its last partial batch, so a rank whose question count is one
    more than a multiple of the batch size trains on a single question: blocks with batch
    statistics must not crash or go non-finite there, even when its image's map is one cell
    (one value per channel: a small image through a deep stage)."""
    block = build(path, **variant).train()
    visual, text, mask = inputs()
    grids = GRIDS
    if grid == "1x1":
        visual, grids = [v[..., :1, :1] for v in visual], [(1, 1)]
    keep = 1  # the padded question: padding must stay inert at B=1 too
    visual = [v[keep : keep + 1].clone().requires_grad_() for v in visual]
    text, mask = text[keep : keep + 1].clone().requires_grad_(), mask[keep : keep + 1]
    out = block(visual, text, mask)
    assert out.features.shape == (1, block.out_dim)
    assert torch.isfinite(out.features).all()
    check_maps(out, mask, grids)
    backward_random_projection(out)
    for name, param in block.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
    check_input_gradients(visual, text, mask)


@pytest.mark.parametrize("path", FUSION_CONFIGS, ids=NAMES)
def test_samples_do_not_leak_into_each_other(path: Path) -> None:
    block = build(path)
    visual, text, mask = inputs()
    changed = 1
    visual2 = [v.clone() for v in visual]
    for v in visual2:
        v[changed] = torch.randn_like(v[changed])
    text2 = text.clone()
    text2[changed] = torch.randn_like(text2[changed])
    with torch.no_grad():
        out, out2 = block(visual, text, mask), block(visual2, text2, mask)
    others = [i for i in range(len(LENGTHS)) if i != changed]
    torch.testing.assert_close(out2.features[others], out.features[others], atol=ATOL, rtol=0)
    for key, att in out.attention.items():
        torch.testing.assert_close(out2.attention[key][others], att[others], atol=ATOL, rtol=0)
    assert not torch.allclose(out2.features[changed], out.features[changed], atol=1e-4)


POSITIONAL_CASES = [p for p in FUSION_CONFIGS if p.stem in CELL_PERMUTATION_INVARIANT]


@pytest.mark.parametrize("path", POSITIONAL_CASES, ids=[p.stem for p in POSITIONAL_CASES])
def test_box_embeddings_make_cell_positions_matter(path: Path) -> None:
    """Mirroring the grid left-right changes the answer features only when boxes are embedded."""
    visual, text, mask = inputs()
    mirrored = [v.flip(-1) for v in visual]
    with torch.no_grad():
        for positional in (False, True):
            block = build(path, positional=positional)
            out, flipped = block(visual, text, mask), block(mirrored, text, mask)
            same = torch.allclose(flipped.features, out.features, atol=ATOL)
            assert same is not positional, f"positional={positional}"
            if not positional:
                image = next(k for k in out.attention if k.startswith("image"))
                torch.testing.assert_close(
                    flipped.attention[image], out.attention[image].flip(-1), atol=ATOL, rtol=0
                )


def test_parallel_top_k_keeps_at_most_k_cells_and_words() -> None:
    block = build(CONFIG_DIR / "fusion" / "parallel.yaml", top_k=2)
    visual, text, mask = inputs()
    with torch.no_grad():
        out = block(visual, text, mask)
    assert ((out.attention["image"] > 0).flatten(1).sum(1) <= 2).all()
    real = torch.tensor(LENGTHS)
    assert ((out.attention["question"] > 0).sum(1) == real.clamp(max=2)).all()
