"""Writes ``tests/data/legacy_fusion_blocks.pt.gz``: every fusion block as older code built it.

The file was written by the fusion code of commit 23d437b, before the attention maths moved to
``vqa/models/fusion/attention.py`` and parameter names changed. For each case below it holds
the block's options, its state dict (old parameter names), and the features and attention maps
it gave in eval mode on one fixed input. ``tests/test_fusion_legacy_keys.py`` loads each state
dict into the current block (through the block's ``LEGACY_KEYS``) and checks the current code
gives the same outputs, and that the same seed still gives the same initial weights.

Regenerating it with the current code would make that test compare the code with itself, so
only do it on purpose, from a tree of the old code (this script copied into its ``tests/``)::

    git archive 23d437b | tar -x -C /tmp/old
    cp tests/make_legacy_fusion_fixture.py /tmp/old/tests/
    (cd /tmp/old && /work/main/.venv/bin/python tests/make_legacy_fusion_fixture.py)
    cp /tmp/old/tests/data/legacy_fusion_blocks.pt.gz tests/data/

It writes into ``tests/data/`` of the tree it runs from. The test compares outputs bit for bit,
so the fixture is recorded with one CPU thread, as the tests run.

Blocks are tiny (hidden_dim 8, stages of 4 and 8 channels, 6-wide words) and the file is a
gzip-compressed ``torch.save`` (read it with ``load_fixture``), so it stays a few tens of KB.
Before the outputs are recorded, one train-mode forward moves the BatchNorm running statistics
away from their initial values, so the buffers' names are checked too; parameters are still
their seed-0 initial values.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "legacy_fusion_blocks.pt.gz"

VISUAL_CHANNELS = [4, 8]
GRIDS = [(3, 3), (2, 2)]
TEXT_DIM = 6
HIDDEN = 8
LENGTHS = [4, 2, 1]  # real tokens per question: full, padded, a single word
SEED = 0

PACKAGE = "vqa.models.fusion"
# name -> (class path, options on top of the sizes above)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "parallel-maxpool": (
        f"{PACKAGE}.parallel.ParallelCoAttention",
        {"form": "maxpool", "spatial_constraint": True},
    ),
    "parallel-lu": (
        f"{PACKAGE}.parallel.ParallelCoAttention",
        {"form": "lu", "spatial_constraint": True, "top_k": 2},
    ),
    "alternating": (
        f"{PACKAGE}.alternating.AlternatingCoAttention",
        {"steps": 2, "spatial_constraint": True},
    ),
    "hierarchical-parallel": (
        f"{PACKAGE}.hierarchical.HierarchicalCoAttention",
        {"mode": "parallel", "spatial_constraint": True},
    ),
    "hierarchical-alternating": (
        f"{PACKAGE}.hierarchical.HierarchicalCoAttention",
        {"mode": "alternating", "spatial_constraint": True, "top_k": 2},
    ),
    "multihead": (
        f"{PACKAGE}.multihead.MultiheadCoAttention",
        {"num_heads": 2, "spatial_constraint": True, "top_k": 3},
    ),
    "cot": (f"{PACKAGE}.cot.CoTAttention", {"groups": 2, "spatial_constraint": True}),
    "early": (f"{PACKAGE}.early.EarlyFusion", {"spatial_constraint": True}),
    "late": (f"{PACKAGE}.late.LateFusion", {}),
    "film": (f"{PACKAGE}.film.FiLMFusion", {}),
    "film-glimpses": (f"{PACKAGE}.film.FiLMFusion", {"glimpses": 2}),
}


def fixed_inputs() -> tuple[list[Tensor], Tensor, Tensor]:
    """Two stage maps and right-padded questions whose padding holds loud junk."""
    g = torch.Generator().manual_seed(SEED)
    batch, length = len(LENGTHS), max(LENGTHS)
    visual = [
        torch.randn(batch, c, h, w, generator=g)
        for c, (h, w) in zip(VISUAL_CHANNELS, GRIDS, strict=True)
    ]
    mask = torch.arange(length) < torch.tensor(LENGTHS).unsqueeze(1)
    text = torch.randn(batch, length, TEXT_DIM, generator=g)
    text = torch.where(mask.unsqueeze(-1), text, 100 * torch.randn(text.shape, generator=g))
    return visual, text, mask


def build(target: str, options: dict[str, Any]) -> torch.nn.Module:
    """The case's block, built right after ``torch.manual_seed(SEED)``."""
    torch.manual_seed(SEED)
    return get_class(target)(
        visual_channels=VISUAL_CHANNELS, text_dim=TEXT_DIM, hidden_dim=HIDDEN, **options
    )


def record(target: str, options: dict[str, Any]) -> dict[str, Any]:
    block = build(target, options)
    visual, text, mask = fixed_inputs()
    with torch.no_grad():
        block.train()(visual, text, mask)  # moves the BatchNorm running statistics
        out = block.eval()(visual, text, mask)
    return {
        "target": target,
        "options": options,
        "state_dict": {k: v.clone() for k, v in block.state_dict().items()},
        "features": out.features.clone(),
        "attention": {k: v.clone() for k, v in out.attention.items()},
    }


def load_fixture(path: Path = FIXTURE) -> dict[str, Any]:
    """The recorded fixture (plain tensors, lists and dicts only, so ``weights_only`` holds)."""
    with gzip.open(path, "rb") as file:
        return torch.load(file, weights_only=True)


def main() -> None:
    torch.set_num_threads(1)  # as the test session runs (tests/helpers.py): same rounding
    visual, text, mask = fixed_inputs()
    fixture = {
        "sizes": {
            "visual_channels": VISUAL_CHANNELS,
            "grids": GRIDS,
            "text_dim": TEXT_DIM,
            "hidden_dim": HIDDEN,
            "lengths": LENGTHS,
            "seed": SEED,
        },
        "inputs": {"visual": visual, "text": text, "mask": mask},
        "blocks": {name: record(target, options) for name, (target, options) in CASES.items()},
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    # No time stamp or name in the gzip header: the same fixture gives the same bytes.
    with FIXTURE.open("wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as file:
        torch.save(fixture, file)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1024:.1f} KiB, {len(CASES)} blocks)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
