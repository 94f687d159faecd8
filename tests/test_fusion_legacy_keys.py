"""State dicts saved before the attention maths moved to ``vqa/models/fusion/attention.py``.

``tests/data/legacy_fusion_blocks.pt.gz`` (written by ``tests/make_legacy_fusion_fixture.py``
with the code of that time) holds, per block and variant, the old state dict and the outputs
the old code computed with it. The current blocks must load those state dicts strictly (the
block's ``LEGACY_KEYS`` renames the old parameter names), compute the same outputs, and, built
after the same seed, start from the same initial weights (parameters are created in the old
order).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hydra.utils import get_class
from torch import nn

from tests.make_legacy_fusion_fixture import CASES, build, load_fixture
from vqa.checkpoint import load_weights
from vqa.models.fusion.base import FusionBlock, upgrade_legacy_keys

FIXTURE = load_fixture()
NAMES = list(FIXTURE["blocks"])


def recorded(name: str) -> dict[str, Any]:
    return FIXTURE["blocks"][name]


def test_fixture_covers_every_case() -> None:
    assert list(CASES) == NAMES
    for name, (target, options) in CASES.items():
        assert (recorded(name)["target"], recorded(name)["options"]) == (target, options)


@pytest.mark.parametrize("name", NAMES)
def test_old_state_dict_loads_and_gives_the_recorded_outputs(name: str) -> None:
    case = recorded(name)
    block = build(case["target"], case["options"])
    block.load_state_dict(case["state_dict"])  # strict
    visual, text, mask = (FIXTURE["inputs"][k] for k in ("visual", "text", "mask"))
    with torch.no_grad():
        out = block.eval()(visual, text, mask)
    assert torch.equal(out.features, case["features"])
    assert list(out.attention) == list(case["attention"])
    for key, expected in case["attention"].items():
        assert torch.equal(out.attention[key], expected), key


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_the_old_initial_weights(name: str) -> None:
    """Parameters only: the fixture's buffers hold running statistics of one forward."""
    case = recorded(name)
    block = build(case["target"], case["options"])
    renamed = block.current_keys(case["state_dict"])
    parameters = dict(block.named_parameters())
    assert sorted(renamed[k] for k in case["state_dict"]) == sorted(block.state_dict())
    for old, value in case["state_dict"].items():
        if renamed[old] in parameters:
            assert torch.equal(parameters[renamed[old]], value), old


@pytest.mark.parametrize("name", NAMES)
def test_current_names_are_never_renamed(name: str) -> None:
    """No current key starts with an old prefix, so a new state dict loads as it is."""
    case = recorded(name)
    block = build(case["target"], case["options"])
    keys = list(block.state_dict())
    assert list(block.current_keys(keys).values()) == keys
    assert not [k for k in keys for old in type(block).LEGACY_KEYS if k.startswith(old)]


def test_old_names_load_inside_a_model_and_upgrade_for_key_checks() -> None:
    """The rename also applies with the block nested in a model (prefix ``fusion.``), and
    ``upgrade_legacy_keys`` gives the current names to code that compares keys first."""
    case = recorded("alternating")
    model = nn.Module()
    model.fusion = build(case["target"], case["options"])
    old = {f"fusion.{k}": v for k, v in case["state_dict"].items()}
    model.load_state_dict(old)
    assert torch.equal(model.fusion.attention.summary.key.weight, old["fusion.summary.key.weight"])
    assert sorted(upgrade_legacy_keys(model, old)) == sorted(model.state_dict())
    # The checkpoint loader compares keys before loading: old names pass it too.
    fresh = nn.Module()
    fresh.fusion = build(case["target"], case["options"])
    load_weights(fresh, old, "an old checkpoint")
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    ("name", "other"),
    [("parallel-lu", "parallel-maxpool"), ("hierarchical-parallel", "hierarchical-alternating")],
)
def test_unknown_keys_are_refused_in_plain_words(name: str, other: str) -> None:
    block = build(recorded(name)["target"], recorded(name)["options"])
    state = dict(recorded(name)["state_dict"])
    state["bogus.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"has no parameter or buffer named bogus\.weight"):
        block.load_state_dict(state)
    # Another variant's weights: its old names are not renamed into this block's.
    with pytest.raises(RuntimeError, match="does not fit") as error:
        block.load_state_dict(recorded(other)["state_dict"])
    assert "other options" in str(error.value)
    block.load_state_dict(state, strict=False)  # non-strict loads still skip what does not fit


def test_every_fusion_class_is_in_the_fixture() -> None:
    """A block added later needs no entry (it has no older names), but the ones that existed
    when the names changed must all be covered."""
    classes = {get_class(target) for target, _ in CASES.values()}
    assert all(issubclass(cls, FusionBlock) for cls in classes)
    renamed = {cls for cls in classes if cls.LEGACY_KEYS}
    assert {cls.__name__ for cls in renamed} == {
        "ParallelCoAttention",
        "AlternatingCoAttention",
        "HierarchicalCoAttention",
        "MultiheadCoAttention",
        "FiLMFusion",
    }
