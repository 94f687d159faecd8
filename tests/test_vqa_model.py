"""VQAModel end to end, built from the shipped yamls with tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vqa.models.head import MLPHead
from vqa.models.vqa_model import VQAModel, VQAOutput

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NUM_ANSWERS = 7
VOCAB = 30
LENGTHS = [6, 4, 2]


def load(group: str, name: str, **overrides) -> object:
    cfg = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return instantiate(cfg)


@pytest.fixture(scope="module")
def model() -> VQAModel:
    torch.manual_seed(0)
    text_config = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    return VQAModel(
        visual=load("model/visual", "resnet18", stages=["layer2", "layer3"]),
        text=load("model/text", "bert_tiny", config={**text_config, "intermediate_size": 32}),
        fusion=load("fusion", "parallel", hidden_dim=16),
        head=load("head", "mlp", hidden_dim=16),
        num_answers=NUM_ANSWERS,
        vocab_size=VOCAB,
    ).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    ids = torch.randint(1, VOCAB, mask.shape, generator=g) * mask
    return {
        "images": torch.randn(len(LENGTHS), 3, 32, 32, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
    }


def test_pieces_are_sized_from_each_other(model: VQAModel) -> None:
    assert model.fusion.visual_channels == [128, 256]
    assert model.fusion.text_dim == model.text.hidden_size == 16
    assert isinstance(model.head, MLPHead)
    assert model.head.in_features == model.fusion.out_dim
    assert model.text.model.get_input_embeddings().num_embeddings == VOCAB


def test_forward_gives_logits_and_attention(model: VQAModel) -> None:
    with torch.no_grad():
        out = model(**batch())
    assert isinstance(out, VQAOutput)
    assert out.logits.shape == (len(LENGTHS), NUM_ANSWERS)
    assert torch.isfinite(out.logits).all()
    assert out.attention["image"].shape == (len(LENGTHS), 2, 2)  # layer3 of a 32 px image
    torch.testing.assert_close(out.attention["question"].sum(1), torch.ones(len(LENGTHS)))


def test_cached_visual_features_equal_the_image_path(model: VQAModel) -> None:
    inputs = batch()
    images = inputs.pop("images")
    with torch.no_grad():
        cached = model.encode_image(images)
        from_images = model(images=images, **inputs)
        from_cache = model(visual_features=cached, **inputs)
    torch.testing.assert_close(from_cache.logits, from_images.logits)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"images": torch.zeros(1, 3, 32, 32), "visual_features": [torch.zeros(1, 128, 4, 4)]}],
    ids=["neither", "both"],
)
def test_exactly_one_visual_input(model: VQAModel, kwargs: dict) -> None:
    inputs = batch()
    inputs.pop("images")
    with pytest.raises(ValueError, match="exactly one"):
        model(**inputs, **kwargs)


def test_all_false_drop_masks_are_a_no_op(model: VQAModel) -> None:
    none = torch.zeros(len(LENGTHS), dtype=torch.bool)
    with torch.no_grad():
        plain = model(**batch())
        masked = model(**batch(), drop_image=none, drop_question=none)
    torch.testing.assert_close(masked.logits, plain.logits, atol=0, rtol=0)


def test_dropped_image_no_longer_matters(model: VQAModel) -> None:
    drop = torch.tensor([True, False, False])
    other = batch()
    other["images"][0] = torch.randn(3, 32, 32)
    with torch.no_grad():
        plain = model(**batch())
        dropped = model(**batch(), drop_image=drop)
        dropped_other = model(**other, drop_image=drop)
    torch.testing.assert_close(dropped_other.logits[0], dropped.logits[0])
    assert not torch.allclose(dropped.logits[0], plain.logits[0], atol=1e-4)
    torch.testing.assert_close(dropped.logits[1:], plain.logits[1:])


def test_dropped_question_no_longer_matters(model: VQAModel) -> None:
    drop = torch.tensor([False, True, False])
    other = batch()
    other["input_ids"][1] = torch.randint(1, VOCAB, (max(LENGTHS),))
    other["attention_mask"][1] = 1  # a different question, of a different length
    with torch.no_grad():
        plain = model(**batch())
        dropped = model(**batch(), drop_question=drop)
        dropped_other = model(**other, drop_question=drop)
    torch.testing.assert_close(dropped_other.logits[1], dropped.logits[1])
    assert not torch.allclose(dropped.logits[1], plain.logits[1], atol=1e-4)
    torch.testing.assert_close(dropped.logits[[0, 2]], plain.logits[[0, 2]])
    # The null token is the one real position left, so the question map is one-hot on it.
    expected = torch.zeros(max(LENGTHS))
    expected[0] = 1.0
    torch.testing.assert_close(dropped.attention["question"][1], expected)


def test_null_inputs_learn(model: VQAModel) -> None:
    model.zero_grad()
    out = model(
        **batch(),
        drop_image=torch.tensor([True, False, False]),
        drop_question=torch.tensor([False, True, False]),
    )
    out.logits.square().sum().backward()
    for param in (model.null_image, model.null_question):
        assert param.grad is not None and param.grad.abs().sum() > 0
    model.zero_grad()


def test_every_parameter_takes_part_even_when_nothing_is_dropped(model: VQAModel) -> None:
    """DDP (without find_unused_parameters) needs every parameter in every step's graph."""
    model.zero_grad(set_to_none=True)
    keep = torch.zeros(len(LENGTHS), dtype=torch.bool)
    model(**batch(), drop_image=keep, drop_question=keep).logits.sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    model.zero_grad()


def test_head_layer_norm_divides_out_the_input_scale_and_norm_none_keeps_it() -> None:
    """Why film's quick-start turns the head's LayerNorm off: with it, twice the features (two
    objects summed instead of one) give the same logits."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    for norm, scale_invariant in (("layer", True), ("none", False)):
        head = MLPHead(16, 5, hidden_dim=32, dropout=0.0, norm=norm).eval()
        torch.nn.init.zeros_(head[0].bias)
        with torch.no_grad():
            same = torch.allclose(head(x), head(2 * x), atol=1e-4)
        assert same == scale_invariant, norm
    with pytest.raises(ValueError, match="head norm"):
        MLPHead(16, 5, norm="batch")
