"""VQAModel with several images per question (visual streams) and conditioning fields.

Tiny sizes throughout: stage maps are handed in as ``visual_features`` (no ResNet) unless an
encoder itself is under test, where a two-conv stand-in or ResNet-18 up to layer1 serves. The
batches are built here, not by the datamodule.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from tests.helpers import TINY_OVERRIDES, compose_config
from vqa.checkpoint import (
    CheckpointError,
    TrainedModel,
    build_model,
    load_weights,
    recorded_model_args,
)
from vqa.lit_module import VQALitModule
from vqa.models.combiner import AttentionCombiner, ConcatCombiner
from vqa.models.norms import SafeBatchNorm2d
from vqa.models.streams import StreamEncoders, StreamFusion, stream_key
from vqa.models.visual import ResNetEncoder
from vqa.models.vqa_model import VQAModel, data_model_args
from vqa.optim import parameter_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHANNELS = [8, 16]
GRIDS = [(4, 4), (2, 2)]
HIDDEN = 16
NUM_ANSWERS = 5
VOCAB = 30
LENGTHS = [5, 3, 4]
STREAMS = ["left", "right"]
# Question b reads row IMAGE_INDEX[b][k] for stream k; row 1 is read by two streams (once as a
# right image, once as a left one), as a batch holds an image used by two streams once.
IMAGE_INDEX = [[0, 1], [2, 3], [1, 4]]
QUADRANTS = ["bottom left", "bottom right", "top left", "top right"]
ATOL = 1e-5


class StageMaps(nn.Module):
    """A visual encoder that is never run: the batches carry its stage maps."""

    out_channels = CHANNELS


class TinyEncoder(nn.Module):
    """Two strided convs with batch norms: 16 px images -> stages of 8 and 16 channels."""

    out_channels = CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), SafeBatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), SafeBatchNorm2d(16), nn.ReLU())

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        a = self.a(images)
        return OrderedDict(a=a, b=self.b(a))


class OneStream(nn.Module):
    """A combiner that passes on stream ``stream`` alone: what reaches the head then depends
    on that stream's path only."""

    def __init__(self, in_features: int, num_streams: int, stream: int) -> None:
        super().__init__()
        self.out_dim = in_features
        self.stream = stream

    def forward(self, features: Tensor) -> Tensor:
        return features[:, self.stream]


def load(group: str, name: str, **overrides: Any) -> Any:
    cfg = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return instantiate(cfg)


TEXT_CONFIG = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def build_text() -> nn.Module:
    return load("model/text", "bert_tiny", config=TEXT_CONFIG)(vocab_size=VOCAB)


def build(
    fusion: str = "parallel",
    visual: nn.Module | None = None,
    combiner: str | Any = "concat",
    seed: int = 0,
    **kwargs: Any,
) -> VQAModel:
    """A tiny model (eval mode), drawn from ``seed``; ``kwargs`` go to VQAModel."""
    torch.manual_seed(seed)
    overrides: dict[str, Any] = {"hidden_dim": HIDDEN}
    if "attention_dropout" in OmegaConf.load(CONFIGS / "fusion" / f"{fusion}.yaml"):
        overrides["attention_dropout"] = 0.0
    return VQAModel(
        visual=StageMaps() if visual is None else visual,
        text=load("model/text", "bert_tiny", config=TEXT_CONFIG),
        fusion=load("fusion", fusion, **overrides),
        head=load("head", "mlp", hidden_dim=HIDDEN, dropout=0.0),
        combiner=load("combiner", combiner) if isinstance(combiner, str) else combiner,
        num_answers=NUM_ANSWERS,
        vocab_size=VOCAB,
        **kwargs,
    ).eval()


def text_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    return {
        "input_ids": torch.randint(1, VOCAB, mask.shape, generator=g) * mask,
        "attention_mask": mask,
    }


def pair_inputs(seed: int = 0) -> dict[str, Any]:
    """Three questions about pairs of five distinct images, as stage maps."""
    g = torch.Generator().manual_seed(seed)
    images = 1 + max(max(row) for row in IMAGE_INDEX)
    visual = [
        torch.randn(images, c, h, w, generator=g) for c, (h, w) in zip(CHANNELS, GRIDS, strict=True)
    ]
    return {
        **text_inputs(seed),
        "visual_features": visual,
        "image_index": torch.tensor(IMAGE_INDEX),
    }


def image_inputs(seed: int = 0, size: int = 16) -> dict[str, Any]:
    """The pairs as images (for models that run their encoders)."""
    inputs = pair_inputs(seed)
    del inputs["visual_features"]
    g = torch.Generator().manual_seed(seed + 1)
    inputs["images"] = torch.randn(1 + int(inputs["image_index"].max()), 3, size, size, generator=g)
    return inputs


def longer_padding(inputs: dict[str, Any], extra: int = 3) -> dict[str, Any]:
    """The same questions with ``extra`` more padded positions, holding junk token ids."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    junk = torch.randint(
        1, VOCAB, (ids.shape[0], ids.shape[1] + extra), generator=torch.Generator().manual_seed(9)
    )
    longer_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    longer_ids = torch.where(longer_mask.bool(), torch.cat([ids, junk[:, ids.shape[1] :]], 1), junk)
    return {**inputs, "input_ids": longer_ids, "attention_mask": longer_mask}


# ----------------------------------------------------------------- the single-image model stays


# The default model's keys outside the text encoder, as the code before streams wrote them.
SINGLE_IMAGE_KEYS = [
    "null_image",
    "null_question",
    "fusion.image_proj.weight",
    "fusion.image_proj.bias",
    "fusion.text_proj.weight",
    "fusion.text_proj.bias",
    "head.0.weight",
    "head.0.bias",
    "head.1.weight",
    "head.1.bias",
    "head.4.weight",
    "head.4.bias",
]


def test_without_streams_and_fields_the_model_is_the_single_image_one() -> None:
    default = build("late")
    explicit = build(
        "late",
        streams=None,
        visual_streams="shared",
        conditioning=None,
        conditioning_inject="visual",
    )
    bare = build("late", combiner=None)
    assert [k for k in default.state_dict() if not k.startswith("text.")] == SINGLE_IMAGE_KEYS
    # Drawn in the order the single-image model always drew them: text, fusion, head, nulls.
    torch.manual_seed(0)
    reference = {
        "text.": build_text(),
        "fusion.": load("fusion", "late", hidden_dim=HIDDEN)(visual_channels=CHANNELS, text_dim=16),
        "head.": load("head", "mlp", hidden_dim=HIDDEN, dropout=0.0)(
            in_features=2 * HIDDEN, num_answers=NUM_ANSWERS
        ),
    }
    null_image = torch.randn(max(CHANNELS)) * 0.02
    null_question = torch.randn(16) * 0.02
    assert torch.equal(default.null_image, null_image)
    assert torch.equal(default.null_question, null_question)
    for prefix, module in reference.items():
        for key, value in module.state_dict().items():
            assert torch.equal(default.state_dict()[prefix + key], value), prefix + key
    for other in (explicit, bare):
        assert other.state_dict().keys() == default.state_dict().keys()
        for key, value in default.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key
    inputs = pair_inputs()
    inputs["image_index"] = inputs["image_index"][:, 0]
    with torch.no_grad():
        expected = default(**inputs)
        got = explicit(**inputs)
    assert torch.equal(got.logits, expected.logits)
    assert default.conditioning is None and default.streams is None
    assert not any(isinstance(m, (StreamFusion, StreamEncoders)) for m in default.modules())


def test_one_named_stream_is_the_single_image_model() -> None:
    """``data.streams=[left]`` on a pair set: the single-image baseline, [B, 1] image index."""
    default = build()
    one = build(streams=["left"], visual_streams="separate")
    assert one.state_dict().keys() == default.state_dict().keys()
    inputs = pair_inputs()
    single = {**inputs, "image_index": inputs["image_index"][:, 0]}
    with torch.no_grad():
        expected = default(**single)
        got = one(**{**inputs, "image_index": inputs["image_index"][:, :1]})
    assert torch.equal(got.logits, expected.logits)
    assert got.attention.keys() == expected.attention.keys() == {"image", "question"}


# ----------------------------------------------------------------- the fusion contract, K streams


@pytest.mark.parametrize("combiner", ["concat", "attention"])
@pytest.mark.parametrize("fusion", ["parallel", "cot"])
def test_streams_keep_the_fusion_contract(fusion: str, combiner: str) -> None:
    model = build(fusion, combiner=combiner, streams=STREAMS)
    inputs = pair_inputs()
    with torch.no_grad():
        out = model(**inputs)
        padded = model(**longer_padding(inputs))
    assert out.logits.shape == (len(LENGTHS), NUM_ANSWERS)
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(padded.logits, out.logits, atol=ATOL, rtol=0)
    single = build(fusion).fusion(
        [stage[:3] for stage in inputs["visual_features"]],
        torch.zeros(3, 5, 16),
        torch.ones(3, 5).bool(),
    )
    expected = {stream_key(key, stream) for stream in STREAMS for key in single.attention}
    assert out.attention.keys() == expected
    assert {key.split("/")[1] for key in out.attention} == set(STREAMS)
    mask = inputs["attention_mask"].bool()
    for key, att in out.attention.items():
        if key.startswith("question"):
            torch.testing.assert_close(att.sum(1), torch.ones(len(LENGTHS)), atol=ATOL, rtol=0)
            assert (att[~mask] == 0).all(), key
        else:
            torch.testing.assert_close(att.sum((1, 2)), torch.ones(len(LENGTHS)), atol=ATOL, rtol=0)


def test_a_question_does_not_depend_on_the_others_in_its_batch() -> None:
    model = build(streams=STREAMS)
    inputs = pair_inputs()
    with torch.no_grad():
        together = model(**inputs).logits
        for b, rows in enumerate(IMAGE_INDEX):
            alone = model(
                input_ids=inputs["input_ids"][b : b + 1],
                attention_mask=inputs["attention_mask"][b : b + 1],
                visual_features=[stage[rows] for stage in inputs["visual_features"]],
                image_index=torch.tensor([[0, 1]]),
            ).logits
            torch.testing.assert_close(alone[0], together[b], atol=ATOL, rtol=0)


@pytest.mark.parametrize("combiner", ["concat", "attention"])
def test_swapping_the_images_of_a_pair_changes_the_answer(combiner: str) -> None:
    model = build(streams=STREAMS, combiner=combiner)
    inputs = pair_inputs()
    swapped = {**inputs, "image_index": inputs["image_index"].flip(1)}
    with torch.no_grad():
        out, other = model(**inputs).logits, model(**swapped).logits
    assert not torch.allclose(out, other, atol=1e-4)


@pytest.mark.parametrize("combiner", ["concat", "attention"])
def test_a_shared_stream_fusion_is_one_block_run_on_every_stream(combiner: str) -> None:
    """`model.stream_fusion=shared`: one block's parameters; each stream's output is that block
    on the stream's images, so the pair's order still reaches the combiner."""
    shared = build(streams=STREAMS, combiner=combiner, stream_fusion="shared")
    separate = build(streams=STREAMS, combiner=combiner)
    assert len(shared.fusion.blocks) == 1 and len(separate.fusion.blocks) == len(STREAMS)
    blocks = shared.fusion_blocks()
    assert len(blocks) == len(STREAMS) and all(b is blocks[0] for b in blocks)
    block_params = sum(p.numel() for p in blocks[0].parameters())
    assert sum(p.numel() for p in shared.parameters()) == sum(
        p.numel() for p in separate.parameters()
    ) - block_params * (len(STREAMS) - 1)
    inputs = pair_inputs()
    swapped = {**inputs, "image_index": inputs["image_index"].flip(1)}
    with torch.no_grad():
        out = shared(**inputs)
        assert not torch.allclose(out.logits, shared(**swapped).logits, atol=1e-4)
        # Each stream's maps are the shared block's on that stream's images alone.
        for k, stream in enumerate(STREAMS):
            index = inputs["image_index"][:, k]
            alone = blocks[0](
                [stage.index_select(0, index) for stage in inputs["visual_features"]],
                shared.text(inputs["input_ids"], inputs["attention_mask"]),
                inputs["attention_mask"].bool(),
            )
            key = next(key for key in alone.attention if key.startswith("image"))
            torch.testing.assert_close(
                out.attention[stream_key(key, stream)], alone.attention[key], rtol=0, atol=1e-6
            )
    with pytest.raises(ValueError, match="stream_fusion"):
        build(streams=STREAMS, stream_fusion="tied")


class Recording(nn.Module):
    """A combiner that keeps the stream features [B, K, D] it is given and passes stream 0 on."""

    def __init__(self, in_features: int, num_streams: int) -> None:
        super().__init__()
        self.out_dim = in_features
        self.seen: Tensor | None = None

    def forward(self, features: Tensor) -> Tensor:
        self.seen = features
        return features[:, 0]


def same_image_in_both_streams(inputs: dict[str, Any]) -> dict[str, Any]:
    index = inputs["image_index"][:, :1].repeat(1, len(STREAMS))
    return {**inputs, "image_index": index}


@pytest.mark.parametrize("training", [False, True])
def test_a_stream_embedding_tells_a_shared_block_which_image_it_reads(training: bool) -> None:
    """With the same image in both streams, a shared block gives both streams the same features
    unless each stream's question tokens carry its embedding. Film batch-normalises the pooled
    question: in training, a per-stream call would subtract the embedding again; the streams
    are fused in one stacked call, so it stays."""
    inputs = same_image_in_both_streams(pair_inputs())
    streams_features = {}
    for embedding in (False, True):
        model = build(
            "film",
            streams=STREAMS,
            combiner=Recording,
            stream_fusion="shared",
            stream_embedding=embedding,
        ).train(training)
        with torch.no_grad():
            model(**inputs)
        streams_features[embedding] = model.fusion.combiner.seen
    plain, tagged = streams_features[False], streams_features[True]
    torch.testing.assert_close(plain[:, 0], plain[:, 1], rtol=0, atol=1e-6)
    assert (tagged[:, 0] - tagged[:, 1]).abs().max() > 1e-4


@pytest.mark.parametrize("fusion", ["film", "parallel"])
def test_a_shared_block_runs_every_stream_at_once_as_it_would_one_by_one(fusion: str) -> None:
    """The stacked call (one ``prepare_visual`` over the batch's images, one ``fuse`` over every
    stream's questions) gives each stream what the block gives it alone, with its embedding."""
    model = build(fusion, streams=STREAMS, stream_fusion="shared", stream_embedding=True)
    inputs = pair_inputs()
    block = model.fusion.blocks[0]
    with torch.no_grad():
        text = model.text(inputs["input_ids"], inputs["attention_mask"])
        mask = inputs["attention_mask"].bool()
        outputs = [
            block(
                [
                    stage.index_select(0, inputs["image_index"][:, k])
                    for stage in inputs["visual_features"]
                ],
                model.fusion.stream_text(text, k),
                mask,
            )
            for k in range(len(STREAMS))
        ]
        expected = model.head(model.fusion.combine(outputs).features)
        got = model(**inputs)
    torch.testing.assert_close(got.logits, expected, rtol=0, atol=ATOL)
    for k, stream in enumerate(STREAMS):
        for key, att in outputs[k].attention.items():
            torch.testing.assert_close(
                got.attention[stream_key(key, stream)], att, rtol=0, atol=ATOL
            )


def test_the_stream_embedding_is_on_by_default_and_off_for_older_checkpoints() -> None:
    """train.yaml turns it on; a checkpoint recorded before the option existed has no
    ``stream_embedding`` in its model config and builds without one (its weights have none)."""
    assert compose_config("train").model.stream_embedding is True
    older = build(streams=STREAMS, stream_fusion="shared")
    assert older.fusion.stream_embedding is None
    assert not any(key.startswith("fusion.stream_embedding") for key in older.state_dict())
    tagged = build(streams=STREAMS, stream_fusion="shared", stream_embedding=True)
    embedding = tagged.fusion.stream_embedding.embedding
    assert embedding.weight.shape == (len(STREAMS), TEXT_CONFIG["hidden_size"])
    with pytest.raises(CheckpointError, match="other visual streams"):
        load_weights(tagged, older.state_dict(), "older.ckpt")


@pytest.mark.parametrize("combiner", [ConcatCombiner, AttentionCombiner])
def test_combiners_keep_the_order_of_the_streams(combiner: type[nn.Module]) -> None:
    torch.manual_seed(0)
    module = combiner(in_features=6, num_streams=3).eval()
    features = torch.randn(4, 3, 6)
    with torch.no_grad():
        out = module(features)
        permuted = module(features[:, [1, 0, 2]])
    assert out.shape == (4, module.out_dim)
    assert not torch.allclose(out, permuted, atol=1e-5)
    with pytest.raises(ValueError, match="num_streams >= 2"):
        combiner(in_features=6, num_streams=1)


@pytest.mark.parametrize("name", ["concat", "attention"])
def test_combiner_configs_build_with_the_model_sizes(name: str) -> None:
    combiner = load("combiner", name)(in_features=12, num_streams=2)
    assert combiner(torch.randn(3, 2, 12)).shape == (3, combiner.out_dim)


def test_a_dropped_image_drops_every_stream_of_its_question() -> None:
    model = build(streams=STREAMS)
    inputs = pair_inputs()
    drop = torch.tensor([False, True, False])
    other = copy.deepcopy(inputs)
    for stage in other["visual_features"]:  # rows 2 and 3: question 1's pair only
        stage[2:4] = torch.randn(stage[2:4].shape)
    with torch.no_grad():
        plain = model(**inputs).logits
        dropped = model(**inputs, drop_image=drop).logits
        dropped_other = model(**other, drop_image=drop).logits
    torch.testing.assert_close(dropped_other[1], dropped[1])
    assert not torch.allclose(dropped[1], plain[1], atol=1e-4)
    torch.testing.assert_close(dropped[[0, 2]], plain[[0, 2]])


@pytest.mark.parametrize("stream_fusion", ["separate", "shared"])
@pytest.mark.parametrize("inject", ["visual", "question"])
def test_every_parameter_of_a_streams_model_takes_part(inject: str, stream_fusion: str) -> None:
    """DDP (without find_unused_parameters) needs every parameter in every step's graph."""
    model = build(
        streams=STREAMS,
        combiner="attention",
        conditioning={"quadrant": 4},
        conditioning_inject=inject,
        stream_fusion=stream_fusion,
        stream_embedding=True,
    ).train()
    keep = torch.zeros(len(LENGTHS), dtype=torch.bool)
    ids = torch.tensor([[1], [0], [3]])
    model(
        **pair_inputs(), drop_image=keep, drop_question=keep, conditioning_ids=ids
    ).logits.sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_streams_need_a_pair_index_and_a_combiner() -> None:
    model = build(streams=STREAMS)
    inputs = pair_inputs()
    with pytest.raises(ValueError, match=r"image_index \[B, K\]"):
        model(**{**inputs, "image_index": inputs["image_index"][:, 0]})
    with pytest.raises(ValueError, match="need a combiner"):
        build(streams=STREAMS, combiner=None)
    with pytest.raises(ValueError, match="distinct"):
        build(streams=["left", "left"])
    with pytest.raises(ValueError, match="visual_streams"):
        build(streams=STREAMS, visual_streams="both")


# ----------------------------------------------------------------- separate encoders


def test_a_stream_learns_through_its_own_encoder_only() -> None:
    for stream in range(len(STREAMS)):
        model = build(
            visual=TinyEncoder(),
            streams=STREAMS,
            visual_streams="separate",
            combiner=functools.partial(OneStream, stream=stream),
        ).train()
        assert isinstance(model.visual, StreamEncoders) and len(model.visual) == len(STREAMS)
        model(**image_inputs()).logits.square().sum().backward()
        for k, encoder in enumerate(model.visual):
            grads = [p.grad for p in encoder.parameters()]
            if k == stream:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), k
            else:
                assert all(g is None or not g.any() for g in grads), k


def test_separate_encoders_normalise_over_the_images_of_their_stream() -> None:
    """Train-mode batch statistics of encoder k (and of stream k's prepare_visual) come from
    the images stream k reads, not from the other stream's images in the batch."""
    model = build(visual=TinyEncoder(), streams=STREAMS, visual_streams="separate").train()
    before = copy.deepcopy(model)
    inputs = image_inputs()
    model(**inputs)
    for k in range(len(STREAMS)):
        rows = sorted({row[k] for row in IMAGE_INDEX})
        encoder = before.visual[k]
        maps = list(encoder(inputs["images"][rows]).values())
        before.fusion.blocks[k].prepare_visual(maps)
        for name in ("a.1", "b.1"):
            for stat in ("running_mean", "running_var"):
                expected = getattr(encoder.get_submodule(name), stat)
                got = getattr(model.visual[k].get_submodule(name), stat)
                torch.testing.assert_close(got, expected, msg=f"{k} {name} {stat}")
        norm, expected_norm = (
            model.fusion.blocks[k].inputs.grid.norm,
            before.fusion.blocks[k].inputs.grid.norm,
        )
        torch.testing.assert_close(norm.running_mean, expected_norm.running_mean)
        torch.testing.assert_close(norm.running_var, expected_norm.running_var)


def test_separate_encoders_start_as_the_configured_one_and_describe_themselves() -> None:
    torch.manual_seed(0)
    encoder = ResNetEncoder("resnet18", stages=["layer1"])
    spec = encoder.describe()
    model = build(visual=encoder, streams=STREAMS, visual_streams="separate")
    for copy_ in model.visual:
        for (name, p), q in zip(
            encoder.state_dict().items(), copy_.state_dict().values(), strict=True
        ):
            assert torch.equal(p, q), name
    described = model.visual.describe()
    assert (described.arch, described.stages, described.channels) == (
        spec.arch,
        spec.stages,
        spec.channels,
    )
    assert described.digests != spec.digests  # no single encoder's feature store matches
    assert described.trainable == tuple(f"{k}.{n}" for k in range(2) for n in spec.trainable)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images, stream=1)[0], encoder(images)["layer1"])
    with pytest.raises(ValueError, match="stream="):
        model.encode_image(images)
    with pytest.raises(ValueError, match="read images"):
        model(**pair_inputs())


def test_separate_encoders_and_their_stream_parts_are_grouped_for_the_optimizer() -> None:
    model = build(
        visual=TinyEncoder(),
        streams=STREAMS,
        visual_streams="separate",
        combiner="attention",
        conditioning={"quadrant": 4},
    )
    groups = {
        g["name"]: {id(p) for p in g["params"]}
        for g in parameter_groups(model, {"visual": 0.1, "text": 0.1})
    }
    visual = groups["visual"] | groups["visual_no_decay"]
    assert visual == {id(p) for p in model.visual.parameters()}
    assert all(
        id(p) in groups["fusion_head"] | groups["fusion_head_no_decay"]
        for p in model.fusion.parameters()
    )
    no_decay = groups["fusion_head_no_decay"]
    assert id(model.fusion.combiner.stream_embedding.weight) in no_decay
    assert id(model.conditioning.embeddings["quadrant"].weight) in no_decay


# ----------------------------------------------------------------- conditioning fields


@pytest.mark.parametrize("inject", ["visual", "question"])
def test_conditioning_labels_change_the_answer_and_unknown_is_row_zero(inject: str) -> None:
    model = build(conditioning={"quadrant": 4, "camera": 2}, conditioning_inject=inject)
    assert model.conditioning_fields == ["quadrant", "camera"]
    inputs = pair_inputs()
    inputs["image_index"] = inputs["image_index"][:, 0]
    ids = torch.tensor([[1, 2], [4, 0], [2, 1]])
    with torch.no_grad():
        labelled = model(**inputs, conditioning_ids=ids).logits
        other = model(**inputs, conditioning_ids=ids.flip(0)).logits
        unknown = model(**inputs, conditioning_ids=torch.zeros_like(ids)).logits
        without = model(**inputs).logits
        padded = model(**longer_padding(inputs), conditioning_ids=ids).logits
    assert not torch.allclose(labelled, other, atol=1e-6)
    torch.testing.assert_close(without, unknown, atol=0, rtol=0)  # no ids: every field unknown
    torch.testing.assert_close(padded, labelled, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        model(**inputs, conditioning_ids=ids[:, :1])


def test_conditioning_with_streams_is_per_question() -> None:
    """Visual labels make the maps per question: two questions about one pair with different
    labels get different answers, and each equals its answer alone."""
    model = build(streams=STREAMS, conditioning={"quadrant": 4})
    inputs = pair_inputs()
    inputs["image_index"] = torch.tensor([[0, 1], [0, 1], [2, 3]])
    inputs = {**inputs, **text_inputs()}
    inputs["input_ids"][1] = inputs["input_ids"][0]
    inputs["attention_mask"][1] = inputs["attention_mask"][0]
    ids = torch.tensor([[1], [2], [3]])
    with torch.no_grad():
        out = model(**inputs, conditioning_ids=ids).logits
        alone = model(
            input_ids=inputs["input_ids"][1:2],
            attention_mask=inputs["attention_mask"][1:2],
            visual_features=[stage[:2] for stage in inputs["visual_features"]],
            image_index=torch.tensor([[0, 1]]),
            conditioning_ids=ids[1:2],
        ).logits
    assert not torch.allclose(out[0], out[1], atol=1e-6)
    torch.testing.assert_close(alone[0], out[1], atol=ATOL, rtol=0)


def test_a_model_without_fields_refuses_conditioning_ids() -> None:
    inputs = pair_inputs()
    inputs["image_index"] = inputs["image_index"][:, 0]
    with pytest.raises(ValueError, match="without conditioning"):
        build()(**inputs, conditioning_ids=torch.zeros(3, 1, dtype=torch.long))


def lit_module(net: VQAModel, **kwargs: Any) -> VQALitModule:
    return VQALitModule(
        net=net,
        answer_vocab=[str(i) for i in range(NUM_ANSWERS)],
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        **kwargs,
    )


def test_conditioning_dropout_trains_the_unknown_embedding() -> None:
    net = build(conditioning={"quadrant": len(QUADRANTS)}).train()
    vocab = {"quadrant": QUADRANTS}
    ids = torch.tensor([[1], [3], [4]])
    never = lit_module(net, conditioning_dropout=0.0, conditioning_vocab=vocab)
    assert torch.equal(never.sample_conditioning_dropout(ids), ids)
    always = lit_module(net, conditioning_dropout=1.0, conditioning_vocab=vocab)
    dropped = always.sample_conditioning_dropout(ids)
    assert not dropped.any()
    inputs = pair_inputs()
    inputs["image_index"] = inputs["image_index"][:, 0]
    net(**inputs, conditioning_ids=dropped).logits.square().sum().backward()
    grad = net.conditioning.embeddings["quadrant"].weight.grad
    assert grad[0].abs().sum() > 0  # the unknown row learns
    assert not grad[1:].any()  # the known values were not seen


def test_conditioning_dropout_drops_whole_questions_at_its_rate() -> None:
    net = build(conditioning={"quadrant": 4, "camera": 2})
    module = lit_module(net, conditioning_vocab={"quadrant": QUADRANTS, "camera": ["a", "b"]})
    assert module.hparams.conditioning_dropout == 0.1  # the default
    torch.manual_seed(0)
    ids = torch.tensor([[2, 1]]).repeat(2000, 1)
    dropped = module.sample_conditioning_dropout(ids)
    rows_dropped = (dropped == 0).all(1)
    assert ((dropped == ids).all(1) | rows_dropped).all()  # all fields of a question, or none
    assert 0.07 < rows_dropped.float().mean() < 0.13


def test_the_module_records_what_the_net_was_built_with() -> None:
    net = build(streams=STREAMS, conditioning={"quadrant": 4})
    module = lit_module(net, conditioning_vocab={"quadrant": QUADRANTS})
    assert module.hparams.streams == STREAMS  # from the net when not given
    assert module.hparams.conditioning_vocab == {"quadrant": QUADRANTS}
    with pytest.raises(ValueError, match="values per field"):
        lit_module(net, conditioning_vocab={"quadrant": QUADRANTS[:3]})
    with pytest.raises(ValueError, match="values per field"):
        lit_module(net)
    with pytest.raises(ValueError, match="streams"):
        lit_module(net, streams=["a", "b"], conditioning_vocab={"quadrant": QUADRANTS})
    plain = lit_module(build())
    assert plain.hparams.streams is None and plain.hparams.conditioning_vocab is None


# ----------------------------------------------------------------- checkpoints


def test_a_checkpoint_rebuilds_the_streams_and_conditioning_model(tmp_path: Path) -> None:
    """What vqa.cli.train builds and records, vqa.checkpoint rebuilds: same keys, same outputs,
    the recorded values surviving a weights_only load."""
    cfg = compose_config(
        "train",
        [
            *TINY_OVERRIDES,
            "model.visual.stages=[layer1]",
            "model.visual_streams=separate",
            "model.conditioning_inject=question",
            "combiner=attention",
        ],
        tmp_path,
    )
    vocab = {"quadrant": QUADRANTS}
    torch.manual_seed(0)
    net = instantiate(
        cfg.model, num_answers=NUM_ANSWERS, vocab_size=VOCAB, **data_model_args(STREAMS, vocab)
    )
    module = instantiate(cfg.module)(
        net=net,
        answer_vocab=[str(i) for i in range(NUM_ANSWERS)],
        streams=STREAMS,
        conditioning_vocab=vocab,
    )
    torch.save({"hyper_parameters": dict(module.hparams)}, tmp_path / "hparams.ckpt")
    hparams = torch.load(tmp_path / "hparams.ckpt", weights_only=True)["hyper_parameters"]
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(1)  # other random weights: only the loaded ones may make them agree
    rebuilt = build_model(model_config, NUM_ANSWERS, VOCAB, **recorded_model_args(hparams))
    load_weights(rebuilt, net.state_dict(), "test")
    assert isinstance(rebuilt.visual, StreamEncoders) and rebuilt.streams == STREAMS
    inputs = {**image_inputs(size=32), "conditioning_ids": torch.tensor([[1], [0], [4]])}
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**inputs).logits, net.eval()(**inputs).logits)
    trained = TrainedModel(rebuilt, None, None, {}, hparams, tmp_path)  # type: ignore[arg-type]
    assert (trained.streams, trained.conditioning_vocab) == (STREAMS, vocab)


def test_a_checkpoint_without_streams_or_fields_builds_as_before() -> None:
    assert recorded_model_args({"answer_vocab": ["yes"]}) == {}
    assert recorded_model_args({"streams": None, "conditioning_vocab": None}) == {}
    assert data_model_args(None, None) == {}
    trained = TrainedModel(None, None, None, {}, {}, Path("x"))  # type: ignore[arg-type]
    assert trained.streams is None and trained.conditioning_vocab is None
    with pytest.raises(CheckpointError, match="conditioning_vocab"):
        recorded_model_args({"conditioning_vocab": {"quadrant": 4}})


def test_weights_of_a_streams_model_do_not_load_into_a_single_image_one() -> None:
    pair = build(streams=STREAMS, conditioning={"quadrant": 4})
    with pytest.raises(CheckpointError, match="other visual streams"):
        load_weights(build(), pair.state_dict(), "pair.ckpt")
