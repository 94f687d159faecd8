"""The batch the loaders yield: device tensors for the model and the loss, host records for scoring.

A dict of strings and tensors crosses to the device whole, and each consumer must know which of
its keys are tensors and which feed the model. :class:`VQABatch` says it once: ``to()`` and
``pin_memory()`` touch only tensors (the DataLoader's pin-memory thread and Lightning's transfer
both call them), the human answers and question texts stay on the host for the official
string-level scorer, and :meth:`VQABatch.model_inputs` is the one way to call ``VQAModel``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


# Not frozen: Lightning's precision plugins that cast inputs (64-true, bf16-true, 16-true) rebuild
# a batch with `apply_to_collection`, which sets the fields of a copy and refuses frozen ones.
@dataclass
class VQABatch:
    """One batch of questions and the distinct images they ask about.

    Model inputs: ``input_ids``/``attention_mask`` [B, N] (right padding); ``image_index`` [B],
    the row of each question's image in ``images`` [U, 3, H, W] or, read from the feature cache,
    ``visual_features`` (one [U, C_s, H_s, W_s] map per stage). Image-grouped batches hold an
    image once however many of its questions they carry. With several images per question
    (``data.streams``, K of them) ``image_index`` is [B, K], column k the row of each question's
    stream-k image; the distinct images of all streams are each one row (``image_id`` is then
    the first stream's). With conditioning fields (``data.conditioning_fields``, F of them)
    ``conditioning_ids`` [B, F] long holds each question's value indices (0: unknown).

    Training and scoring: ``targets`` [B, num_answers] soft scores and ``answer_type_id`` [B]
    long, each question's index in :data:`vqa.metrics.ANSWER_TYPES` (annotated splits; the
    training accuracy groups by answer type on the device with it, without a host-built
    tensor per step); ``question_id``/``image_id`` [B]. With static shapes
    (``data.static_shapes``) the tensors are padded to fixed sizes: ``question_valid`` [B] and
    ``image_valid`` [U] mark the real rows, which come first (padding rows of
    ``answer_type_id`` hold any index).

    Host records, one per real question: ``question``, ``question_type``, ``answer_type``,
    for annotated splits the ten human ``answers`` the official metric scores against, and
    for data that names them (the synthetic set) the ``question_family`` of each question
    (None for data without families, such as VQA v2; an entry is None for a question without
    one).
    """

    input_ids: Tensor
    attention_mask: Tensor
    image_index: Tensor
    question_id: Tensor
    image_id: Tensor
    images: Tensor | None = None
    visual_features: tuple[Tensor, ...] | None = None
    targets: Tensor | None = None
    question_valid: Tensor | None = None
    image_valid: Tensor | None = None
    answer_type_id: Tensor | None = None
    conditioning_ids: Tensor | None = None
    question: tuple[str, ...] = ()
    question_type: tuple[str, ...] = ()
    answer_type: tuple[str, ...] = ()
    answers: tuple[tuple[str, ...], ...] | None = None
    question_family: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.visual_features is None):
            raise ValueError("a VQABatch carries either images or visual_features, not both")
        # The real-question count is read from the host records (no device read): a batch
        # built with some of them left out would score and weigh the wrong number of rows.
        records: dict[str, Sequence[Any]] = {
            "question": self.question,
            "question_type": self.question_type,
            "answer_type": self.answer_type,
        }
        if self.answers is not None:
            records["answers"] = self.answers
        if self.question_family is not None:
            records["question_family"] = self.question_family
        counts = {name: len(values) for name, values in records.items()}
        if len(set(counts.values())) > 1 or counts["question"] > self.num_questions:
            raise ValueError(
                "a VQABatch holds one host record per real question in each of question, "
                "question_type, answer_type (and answers, question_family), at most "
                f"{self.num_questions}; got {counts}"
            )

    @property
    def num_questions(self) -> int:
        """Rows of the tensors, padding included."""
        return self.input_ids.shape[0]

    @property
    def num_images(self) -> int:
        """Rows of ``images``/``visual_features``: the batch's distinct images (and padding)."""
        visual = self.images if self.images is not None else (self.visual_features or ())[0]
        return visual.shape[0]

    @property
    def num_real_questions(self) -> int:
        """Questions that are not padding: they come first, one host record each."""
        return len(self.question)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of ``VQAModel.forward``; the padding masks of a static-shape batch
        among them, since the model's batch norms in train mode must skip the padding rows."""
        inputs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "image_index": self.image_index,
        }
        if self.images is not None:
            inputs["images"] = self.images
        else:
            inputs["visual_features"] = list(self.visual_features or ())
        if self.question_valid is not None:
            inputs["question_valid"] = self.question_valid
        if self.image_valid is not None:
            inputs["image_valid"] = self.image_valid
        if self.conditioning_ids is not None:
            inputs["conditioning_ids"] = self.conditioning_ids
        return inputs

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> VQABatch:
        """A copy with ``fn`` applied to every tensor; host records are shared, not copied."""
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
            elif f.name == "visual_features" and value is not None:
                changes[f.name] = tuple(fn(v) for v in value)
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> VQABatch:
        """Tensors to ``device``; asynchronous to a GPU (the loader pins them in that case)."""
        device = torch.device(device)
        if non_blocking is None:
            non_blocking = device.type == "cuda"
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self, device: Any = None) -> VQABatch:
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        return self.map_tensors(lambda t: t.pin_memory())
