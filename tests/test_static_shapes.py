"""Static-shape batches (``data.static_shapes``): every training batch has the configured
questions, images and tokens, and the padding changes nothing the model learns.

The padded batch's loss over its real questions, every parameter's gradient and every running
BatchNorm statistic equal the unpadded batch's, for every ``configs/fusion/*.yaml`` and for a
ResNet that trains its BatchNorms, with batch statistics active (train mode).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointError, checkpoint

from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config
from vqa.data.batch import VQABatch
from vqa.data.collate import StaticShapes, VQACollator, pad_to_static_shapes
from vqa.data.datamodule import VQADataModule
from vqa.data.errors import DataError
from vqa.data.samplers import (
    DistributedImageGroupedSampler,
    ImageGroupedSampler,
    max_images_per_batch,
)
from vqa.data.table import column
from vqa.models.norms import SafeBatchNorm1d, SafeBatchNorm2d, checkpoint_contexts, padding_rows
from vqa.models.vqa_model import VQAModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FUSIONS = sorted(p.stem for p in (CONFIGS / "fusion").glob("*.yaml"))
CHANNELS = [8, 16]
GRIDS = [(6, 6), (3, 3)]
VOCAB, NUM_ANSWERS, HIDDEN = 30, 7, 16
IMAGE_INDEX = [0, 0, 1, 2, 2]  # five questions about three images
LENGTHS = [6, 4, 2, 5, 3]
PADDED = StaticShapes(questions=8, images=5, tokens=9)
PAD_ID = 0
DROP_IMAGE = [False, True, False, False, False]
DROP_QUESTION = [False, False, False, True, False]


# ---------------------------------------------------------------------------------- the norms


def padded_rows(x: Tensor, extra: int) -> tuple[Tensor, Tensor]:
    valid = torch.arange(len(x) + extra) < len(x)
    return torch.cat([x, x[-1:].expand(extra, *x.shape[1:])]), valid


@pytest.mark.parametrize(
    ("norm", "shape"),
    [
        (SafeBatchNorm2d, (5, 4, 3, 3)),
        (SafeBatchNorm1d, (5, 4)),
        (SafeBatchNorm1d, (5, 4, 7)),
        (SafeBatchNorm1d, (1, 4)),  # one value per channel: the running-statistics fallback
        (SafeBatchNorm2d, (1, 4, 1, 1)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_norm_equals_the_unpadded_batch(
    norm: type[nn.Module], shape: tuple[int, ...], momentum: float | None
) -> None:
    torch.manual_seed(0)
    plain = norm(4, momentum=momentum).double()
    nn.init.uniform_(plain.weight)
    nn.init.uniform_(plain.bias)
    plain.running_var.fill_(2.0)
    masked = copy.deepcopy(plain)
    for _ in range(3):  # running statistics compound over steps
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        padded, valid = padded_rows(x, extra=3)
        out = plain(x)
        with padding_rows(valid):
            out_padded = masked(padded)
        torch.testing.assert_close(out_padded[: len(x)], out, rtol=1e-12, atol=1e-12)
        upstream = torch.randn(out.shape, dtype=torch.float64)
        plain_grads = torch.autograd.grad((out * upstream).sum(), [x, plain.weight, plain.bias])
        masked_grads = torch.autograd.grad(
            (out_padded[: len(x)] * upstream).sum(), [x, masked.weight, masked.bias]
        )
        for a, b in zip(plain_grads, masked_grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        for name, buffer in plain.named_buffers():
            torch.testing.assert_close(dict(masked.named_buffers())[name], buffer, msg=name)
    single = shape[0] == 1 and all(s == 1 for s in shape[2:])
    assert int(masked.num_batches_tracked) == (0 if single else 3)


def test_without_a_mask_the_norms_are_nn_batchnorm_bit_for_bit() -> None:
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(4)
    safe = SafeBatchNorm2d(4)
    safe.load_state_dict(reference.state_dict())
    for _ in range(2):
        x = torch.randn(6, 4, 3, 3)
        with padding_rows(None):
            assert torch.equal(safe(x), reference(x))
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(safe.named_buffers())[name], buffer)
    # Eval mode uses running statistics: no sample sees another, so a mask changes nothing.
    safe.eval(), reference.eval()
    x = torch.randn(6, 4, 3, 3)
    with padding_rows(torch.tensor([True] * 3 + [False] * 3)):
        assert torch.equal(safe(x), reference(x))


def test_a_mask_of_other_rows_is_refused() -> None:
    norm = SafeBatchNorm1d(4)
    with padding_rows(torch.ones(3, dtype=torch.bool)), pytest.raises(ValueError, match="rows"):
        norm(torch.randn(5, 4))


def test_reduced_precision_input_keeps_float32_statistics() -> None:
    torch.manual_seed(0)
    plain, masked = SafeBatchNorm2d(4), SafeBatchNorm2d(4)
    x = torch.randn(5, 4, 3, 3).to(torch.bfloat16)
    padded, valid = padded_rows(x, extra=3)
    out = plain(x.float())
    with padding_rows(valid):
        out_padded = masked(padded)
    assert out_padded.dtype == torch.bfloat16
    torch.testing.assert_close(out_padded[:5].float(), out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(masked.running_mean, plain.running_mean)
    torch.testing.assert_close(masked.running_var, plain.running_var)


def test_checkpoint_recomputation_needs_the_forward_mask() -> None:
    """Gradient checkpointing recomputes in backward, after ``padding_rows`` has closed:
    ``checkpoint_contexts`` hands the forward's mask to the recomputation."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SafeBatchNorm2d(4), nn.ReLU()).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    padded, valid = padded_rows(x, extra=3)

    def grads(context_fn: Any | None) -> list[Tensor]:
        model = copy.deepcopy(layer)
        if context_fn is None:
            out = model(x)
        else:
            with padding_rows(valid):
                out = checkpoint(model, padded, use_reentrant=False, context_fn=context_fn)[:4]
        out.square().sum().backward()
        return [p.grad for p in model.parameters()]

    expected = grads(None)
    for a, b in zip(grads(checkpoint_contexts), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # Without it the recomputation takes the other path, which checkpoint notices.
    with pytest.raises(CheckpointError):
        grads(lambda: (padding_rows(valid), padding_rows(None)))


def test_masked_norm_compiles_without_graph_breaks() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = SafeBatchNorm2d(4)

        def forward(self, x: Tensor, valid: Tensor) -> Tensor:
            with padding_rows(valid):
                return self.norm(x)

    torch.manual_seed(0)
    block = Block()
    x, valid = padded_rows(torch.randn(5, 4, 3, 3), extra=3)
    expected = copy.deepcopy(block)(x, valid)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, valid), expected)


# ---------------------------------------------------------------------------------- the model


class StageMaps(nn.Module):
    """A visual encoder that is never run: batches carry its stage maps (visual_features)."""

    out_channels = CHANNELS


def load(group: str, name: str, **overrides: Any) -> Any:
    cfg = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return instantiate(cfg)


def build_model(fusion: str, visual: nn.Module) -> VQAModel:
    torch.manual_seed(0)
    fusion_cfg = OmegaConf.load(CONFIGS / "fusion" / f"{fusion}.yaml")
    overrides: dict[str, Any] = {"hidden_dim": HIDDEN}
    if "attention_dropout" in fusion_cfg:
        overrides["attention_dropout"] = 0.0  # padding changes the random draws
    text_config = {
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    model = VQAModel(
        visual=visual,
        text=load("model/text", "bert_tiny", config=text_config),
        fusion=load("fusion", fusion, **overrides),
        head=load("head", "mlp", hidden_dim=HIDDEN, dropout=0.0),
        num_answers=NUM_ANSWERS,
        vocab_size=VOCAB,
    ).double()
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:  # statistics that differ from the init, so a wrong mean shows
        norm.momentum = 0.3
    return model


def unpadded_batch(visual_key: str) -> VQABatch:
    g = torch.Generator().manual_seed(1)
    images = 1 + max(IMAGE_INDEX)
    mask = (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    tensors: dict[str, Any] = {
        "image_index": torch.tensor(IMAGE_INDEX),
        "input_ids": torch.randint(1, VOCAB, mask.shape, generator=g) * mask,
        "attention_mask": mask,
        "question_id": torch.arange(len(LENGTHS)),
        "image_id": torch.tensor(IMAGE_INDEX) + 100,
        "targets": torch.rand(len(LENGTHS), NUM_ANSWERS, generator=g, dtype=torch.float64),
    }
    if visual_key == "images":
        tensors["images"] = torch.randn(images, 3, 32, 32, generator=g, dtype=torch.float64)
    else:
        tensors["visual_features"] = tuple(
            torch.randn(images, c, h, w, generator=g, dtype=torch.float64)
            for c, (h, w) in zip(CHANNELS, GRIDS, strict=True)
        )
    return VQABatch(**tensors)


def train_step(model: VQAModel, batch: VQABatch, drop: bool) -> tuple[Tensor, Tensor]:
    """Logits of the real rows and the BCE over the real rows (sum over answers, mean over
    questions), backpropagated."""
    valid = batch.question_valid
    real = len(LENGTHS)
    kwargs = batch.model_inputs()  # the padding masks among them, when the batch has them
    if drop:
        rows = batch.num_questions
        kwargs["drop_image"] = _padded_flags(DROP_IMAGE, rows)
        kwargs["drop_question"] = _padded_flags(DROP_QUESTION, rows)
    out = model(**kwargs)
    per_question = F.binary_cross_entropy_with_logits(
        out.logits, batch.targets, reduction="none"
    ).sum(1)
    weights = torch.ones(real, dtype=per_question.dtype) if valid is None else valid.double()
    loss = (per_question * weights).sum() / weights.sum()
    loss.backward()
    return out.logits[:real], loss


def _padded_flags(flags: list[bool], rows: int) -> Tensor:
    # Padding rows copy the last real question, modality dropout included.
    return torch.tensor(flags + [flags[-1]] * (rows - len(flags)))


def assert_same_training_step(fusion: str, visual: nn.Module, visual_key: str, drop: bool) -> int:
    """One training step on the batch and on its padded copy; returns how many norm buffers
    were compared."""
    model = build_model(fusion, visual)
    padded_model = copy.deepcopy(model)
    batch = unpadded_batch(visual_key)
    padded = pad_to_static_shapes(batch, PADDED, PAD_ID)
    assert padded.input_ids.shape == (PADDED.questions, PADDED.tokens)
    visual = padded.images if padded.images is not None else padded.visual_features[0]
    assert len(visual) == PADDED.images

    logits, loss = train_step(model, batch, drop)
    padded_logits, padded_loss = train_step(padded_model, padded, drop)
    tight = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(padded_loss, loss, **tight)
    torch.testing.assert_close(padded_logits, logits, **tight)
    padded_params = dict(padded_model.named_parameters())
    for name, param in model.named_parameters():
        other = padded_params[name].grad
        assert (param.grad is None) == (other is None), name
        if param.grad is not None:
            torch.testing.assert_close(other, param.grad, msg=name, **tight)
    padded_buffers = dict(padded_model.named_buffers())
    norms = 0
    for name, buffer in model.named_buffers():
        if "running_" in name or "num_batches_tracked" in name:
            norms += 1
            torch.testing.assert_close(padded_buffers[name], buffer, msg=name, **tight)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    return norms


@pytest.mark.parametrize("drop", [False, True], ids=["plain", "modality_dropout"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_padded_batch_trains_like_the_unpadded_one(fusion: str, drop: bool) -> None:
    assert_same_training_step(fusion, StageMaps(), "visual_features", drop)


@pytest.mark.parametrize("fusion", ["film", "cot"])
def test_padded_images_through_a_resnet_that_trains_its_batchnorms(fusion: str) -> None:
    visual = load("model/visual", "resnet18", stages=["layer2", "layer3"], bn="train")
    assert any(isinstance(m, SafeBatchNorm2d) for m in visual.modules())
    norms = assert_same_training_step(fusion, visual, "images", drop=True)
    assert norms > 40  # the ResNet's norms are among those compared


def test_padding_rows_matter_without_masks() -> None:
    """The comparison above can fail: the same padded batch without its masks trains
    differently (BatchNorm statistics include the copies)."""
    model = build_model("film", StageMaps())
    batch = unpadded_batch("visual_features")
    padded = pad_to_static_shapes(batch, PADDED, PAD_ID)
    keys = ("input_ids", "attention_mask", "image_index", "visual_features")
    logits = copy.deepcopy(model)(**{k: getattr(batch, k) for k in keys}).logits
    padded_logits = model(**{k: getattr(padded, k) for k in keys}).logits[: len(LENGTHS)]
    assert not torch.allclose(padded_logits, logits, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- the sampler


def test_image_bound_is_exact_for_these_sizes() -> None:
    # images of 1, 1, 2, 3 and 5 questions: x | 1 1 2 | x spans five images in six questions
    image_ids = [0] + [1] + [2] * 2 + [3] * 3 + [4] * 5
    assert max_images_per_batch(image_ids, 6) == 5
    assert max_images_per_batch(image_ids, 5) == 4  # x | 1 1 | x; 1 1 2 no longer fits
    assert max_images_per_batch(image_ids, 2) == 2
    assert max_images_per_batch(image_ids, 8, grouped=False) == 5  # only five images
    assert max_images_per_batch([0] * 9, 4) == 1


@pytest.mark.parametrize("batch_size", [3, 5, 8, 13])
def test_no_sampled_batch_exceeds_the_bound(batch_size: int) -> None:
    g = torch.Generator().manual_seed(batch_size)
    sizes = (torch.randint(1, 7, (40,), generator=g)).tolist()
    image_ids = [i for i, n in enumerate(sizes) for _ in range(n)]
    bound = max_images_per_batch(image_ids, batch_size)
    worst = 0
    samplers: list[Any] = [ImageGroupedSampler(image_ids, seed=s) for s in range(20)]
    samplers += [
        DistributedImageGroupedSampler(image_ids, num_replicas=3, rank=r, seed=s)
        for r, s in itertools.product(range(3), range(5))
    ]
    for sampler in samplers:
        for epoch in range(3):
            sampler.set_epoch(epoch)
            order = list(sampler)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                worst = max(worst, len({image_ids[i] for i in batch}))
    assert worst <= bound


# ---------------------------------------------------------------------------------- the loader


def sample(question_id: int, image_id: int, tokens: int = 3) -> dict[str, Any]:
    return {
        "image": torch.full((3, 4, 4), float(image_id)),
        "input_ids": [101, *range(5, 5 + tokens - 2), 102],
        "question_id": question_id,
        "image_id": image_id,
        "question": f"q{question_id}",
        "question_type": "what color is the",
        "answer_type": "other",
        "answers": ["red"] * 10,
        "target_index": [1],
        "target_score": [1.0],
    }


def test_collator_pads_with_copies_of_the_last_real_rows() -> None:
    collate = VQACollator(0, 4, static_shapes=StaticShapes(questions=6, images=4, tokens=7))
    samples = [sample(1, 10), sample(2, 10, tokens=5), sample(3, 11)]
    dynamic = VQACollator(0, 4)(samples)
    batch = collate(samples)
    assert batch.question_valid.tolist() == [True] * 3 + [False] * 3
    assert batch.image_valid.tolist() == [True] * 2 + [False] * 2
    assert batch.input_ids.shape == batch.attention_mask.shape == (6, 7)
    assert torch.equal(batch.input_ids[:3, :5], dynamic.input_ids)
    assert (batch.input_ids[:3, 5:] == 0).all() and (batch.attention_mask[:3, 5:] == 0).all()
    for key in (
        "input_ids",
        "attention_mask",
        "image_index",
        "question_id",
        "image_id",
        "answer_type_id",
    ):
        rows = getattr(batch, key)
        assert torch.equal(rows[3:], rows[2:3].expand_as(rows[3:])), key
    assert torch.equal(batch.answer_type_id[:3], dynamic.answer_type_id)
    assert torch.equal(batch.images[:2], dynamic.images)
    assert torch.equal(batch.images[2:], dynamic.images[1:2].expand(2, -1, -1, -1))
    assert torch.equal(batch.targets[:3], dynamic.targets)
    assert (batch.targets[3:] == 0).all()
    assert batch.question == ("q1", "q2", "q3") and len(batch.answers) == 3
    assert batch.num_questions == 6 and batch.num_real_questions == 3


@pytest.mark.parametrize(
    ("shapes", "setting"),
    [
        (StaticShapes(questions=2, images=4, tokens=8), "questions"),
        (StaticShapes(questions=4, images=1, tokens=8), "images"),
        (StaticShapes(questions=4, images=4, tokens=4), "tokens"),
    ],
)
def test_collator_names_the_setting_a_batch_exceeds(shapes: StaticShapes, setting: str) -> None:
    collate = VQACollator(0, 4, static_shapes=shapes)
    with pytest.raises(DataError, match=rf"data\.static_shapes\.{setting}=\d+.*at least"):
        collate([sample(1, 10), sample(2, 10, tokens=5), sample(3, 11)])


def static_datamodule(
    tmp_path: Path, data_dir: Path, static_shapes: str = "{questions:10,images:null,tokens:null}"
) -> VQADataModule:
    cfg = compose_config(
        "train",
        [*TINY_OVERRIDES, *TINY_DATA_OVERRIDES, f"data.static_shapes={static_shapes}"],
        tmp_path,
        data_dir,
    )
    GlobalHydra.instance().clear()
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_every_training_batch_has_the_configured_shapes(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    dm = static_datamodule(tmp_path, shared_data_dir)
    # 4 questions per image, batches of 8: a batch can span 3 images (x | 4 | x)
    assert dm.train_static_shapes() == StaticShapes(questions=10, images=3, tokens=14)
    dynamic = static_datamodule(tmp_path / "dynamic", shared_data_dir, "null")
    real_questions: list[int] = []
    padded_images = 0
    pairs = zip(dm.train_dataloader(), dynamic.train_dataloader(), strict=True)
    for batch, plain in pairs:
        assert batch.input_ids.shape == batch.attention_mask.shape == (10, 14)
        assert batch.image_index.shape == batch.question_valid.shape == (10,)
        assert batch.answer_type_id.shape == (10,)
        assert batch.images.shape == (3, 3, 32, 32) and batch.image_valid.shape == (3,)
        assert batch.targets.shape[0] == 10
        real, images = len(plain.question), len(plain.images)
        assert int(batch.question_valid.sum()) == real == batch.num_real_questions
        assert batch.question_valid.tolist() == [i < real for i in range(10)]
        assert batch.image_valid.tolist() == [i < images for i in range(3)]
        assert len(batch.answers) == len(batch.question_type) == real
        width = plain.input_ids.shape[1]
        assert torch.equal(batch.input_ids[:real, :width], plain.input_ids)
        assert torch.equal(batch.images[:images], plain.images)
        assert batch.image_index[real:].lt(images).all()
        padded_images += 3 - images
        real_questions += batch.question_id[:real].tolist()
    assert sorted(real_questions) == sorted(
        column(dm.datasets[dm.train_split].table, "question_id")
    )
    assert padded_images > 0  # some batch did carry a padding image
    val, dynamic_val = next(iter(dm.val_dataloader())), next(iter(dynamic.val_dataloader()))
    assert fields_present(val) == fields_present(dynamic_val)
    assert val.question_valid is None  # evaluation batches stay as long as they are


def fields_present(batch: VQABatch) -> set[str]:
    return {f.name for f in dataclasses.fields(batch) if getattr(batch, f.name) is not None}


def test_static_shapes_that_cannot_fit_are_refused(tmp_path: Path, shared_data_dir: Path) -> None:
    dm = static_datamodule(tmp_path, shared_data_dir, "{questions:8,images:2,tokens:null}")
    with pytest.raises(ValueError, match=r"data\.static_shapes\.images=2 .* at least 3"):
        dm.train_dataloader()
    make = {"source": None, "batch_size": 8, "max_question_length": 14}
    with pytest.raises(ValueError, match=r"static_shapes\.questions=4 .* at least 8"):
        VQADataModule(**make, static_shapes={"questions": 4})
    with pytest.raises(ValueError, match=r"static_shapes\.tokens=12 .* at least 14"):
        VQADataModule(**make, static_shapes={"questions": 8, "tokens": 12})
    with pytest.raises(ValueError, match="keys"):
        VQADataModule(**make, static_shapes={"questions": 8, "image": 3})
    with pytest.raises(ValueError, match=r"static_shapes\.images must be"):
        VQADataModule(**make, static_shapes={"questions": 8, "images": 0})


@pytest.mark.parametrize("config", sorted((CONFIGS / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_static_shapes_are_off_by_default(config: Path) -> None:
    assert OmegaConf.load(config).static_shapes is None
