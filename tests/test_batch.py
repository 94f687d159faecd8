"""VQABatch: only tensors move or get pinned, host records stay, model inputs are one call."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as loader_pin_memory

from vqa.data.batch import VQABatch
from vqa.metrics import ANSWER_TYPES


def make_batch(features: bool = False) -> VQABatch:
    visual = (
        {"visual_features": (torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2))}
        if features
        else {"images": torch.randn(2, 3, 8, 8)}
    )
    return VQABatch(
        input_ids=torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]]),
        attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]),
        image_index=torch.tensor([0, 0, 1]),
        question_id=torch.tensor([10, 11, 12]),
        image_id=torch.tensor([7, 7, 9]),
        targets=torch.zeros(3, 5),
        answer_type_id=torch.tensor([2, 1, 0]),
        question=("q1", "q2", "q3"),
        question_type=("what", "how many", "is"),
        answer_type=("other", "number", "yes/no"),
        answers=(("a",) * 10, ("2",) * 10, ("yes",) * 10),
        **visual,
    )


def test_to_moves_every_tensor_and_keeps_host_records() -> None:
    batch = make_batch(features=True)
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta"
    assert moved.targets is not None and moved.targets.device.type == "meta"
    assert all(f.device.type == "meta" for f in moved.visual_features or ())
    assert moved.answer_type_id is not None and moved.answer_type_id.device.type == "meta"
    assert moved.answers is batch.answers and moved.question is batch.question
    assert batch.input_ids.device.type == "cpu", "to() must return a copy, not move in place"


def test_model_inputs_are_the_model_arguments_only() -> None:
    assert set(make_batch().model_inputs()) == {
        "images",
        "input_ids",
        "attention_mask",
        "image_index",
    }
    inputs = make_batch(features=True).model_inputs()
    assert set(inputs) == {"visual_features", "input_ids", "attention_mask", "image_index"}
    assert isinstance(inputs["visual_features"], list) and len(inputs["visual_features"]) == 2


def test_model_inputs_carry_the_padding_masks_of_a_static_shape_batch() -> None:
    """The model's batch norms must skip padding rows: the masks go to VQAModel.forward."""
    batch = dataclasses.replace(
        make_batch(),
        question_valid=torch.tensor([True, True, False]),
        image_valid=torch.tensor([True, False]),
    )
    inputs = batch.model_inputs()
    assert inputs["question_valid"] is batch.question_valid
    assert inputs["image_valid"] is batch.image_valid
    assert batch.num_questions == 3


def test_answer_type_ids_index_the_metric_answer_types() -> None:
    batch = make_batch()
    assert batch.answer_type_id is not None
    assert [ANSWER_TYPES[i] for i in batch.answer_type_id.tolist()] == list(batch.answer_type)


def test_a_batch_has_one_visual_input() -> None:
    batch = make_batch()
    with pytest.raises(ValueError, match="either images or visual_features"):
        VQABatch(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            image_index=batch.image_index,
            question_id=batch.question_id,
            image_id=batch.image_id,
        )


def test_real_questions_are_the_host_records() -> None:
    batch = make_batch()
    assert batch.num_questions == 3 and batch.num_real_questions == 3
    padded_like = dataclasses.replace(
        batch, question=("q1",), question_type=("what",), answer_type=("other",), answers=None
    )
    assert padded_like.num_questions == 3 and padded_like.num_real_questions == 1


@pytest.mark.parametrize(
    "records",
    [
        {"question": ()},  # answer types alone would count no real question
        {"answers": (("a",) * 10,)},
        {
            "question": ("q",) * 4,
            "question_type": ("is",) * 4,
            "answer_type": ("yes/no",) * 4,
            "answers": None,
        },
    ],
)
def test_host_records_must_agree_on_the_real_questions(records: dict) -> None:
    with pytest.raises(ValueError, match="one host record per real question"):
        dataclasses.replace(make_batch(), **records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning memory needs a CUDA runtime")
def test_the_loader_pin_memory_thread_pins_the_tensors() -> None:
    pinned = loader_pin_memory(make_batch())
    assert isinstance(pinned, VQABatch) and pinned.input_ids.is_pinned()


def test_the_loader_pin_memory_thread_calls_the_batch_method(monkeypatch) -> None:
    """What the DataLoader's pin-memory thread does with a batch object (no CUDA needed)."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: t.clone())
    batch = make_batch()
    pinned = loader_pin_memory(batch)
    assert isinstance(pinned, VQABatch)
    assert pinned.input_ids is not batch.input_ids and torch.equal(
        pinned.input_ids, batch.input_ids
    )
    assert pinned.answers is batch.answers


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_precision_plugins_cast_a_batch(precision: str) -> None:
    """Lightning's input-casting precisions rebuild the batch field by field."""
    from pytorch_lightning.trainer.connectors.accelerator_connector import (
        _AcceleratorConnector,
    )

    plugin = _AcceleratorConnector(accelerator="cpu", precision=precision).precision_plugin
    cast = plugin.convert_input(make_batch())
    assert isinstance(cast, VQABatch)
    expected = torch.float64 if precision == "64-true" else torch.bfloat16
    assert cast.images is not None and cast.images.dtype == expected
    assert cast.input_ids.dtype == torch.long and cast.answers == make_batch().answers
