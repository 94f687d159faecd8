"""Batch assembly: pad questions to the longest in the batch (or to fixed static shapes),
densify the soft targets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from vqa.data.batch import VQABatch
from vqa.data.errors import DataError
from vqa.metrics import ANSWER_TYPES

if TYPE_CHECKING:
    from vqa.data.features import FeatureStore

ANSWER_TYPE_INDEX = {name: i for i, name in enumerate(ANSWER_TYPES)}


@dataclass(frozen=True)
class StaticShapes:
    """The sizes every batch is padded to: ``questions`` rows (B), distinct ``images`` rows (U),
    question ``tokens`` (N). CUDA graphs replay one recorded shape, so every step must match."""

    questions: int
    images: int
    tokens: int

    def __post_init__(self) -> None:
        for name in ("questions", "images", "tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"data.static_shapes.{name} must be an integer >= 1, got {value!r}"
                )


@dataclass(frozen=True)
class VQACollator:
    """Turns sample dicts from :class:`~vqa.data.dataset.VQADataset` into a
    :class:`~vqa.data.batch.VQABatch`.

    ``images`` [U,3,H,W] float, one per distinct image of the batch, and ``image_index`` [B]
    long, the row of each question's image: VQA has several questions per image, so an
    image-grouped batch runs the visual encoder once per image instead of once per question.
    ``input_ids``/``attention_mask`` [B,N] long (right padding),
    ``question_id``/``image_id`` [B] long, ``question``/``question_type``/``answer_type``
    tuples; for annotated splits also ``answers`` (ten raw strings each), ``targets``
    [B, num_answers] float soft scores and ``answer_type_id`` [B] long; ``question_family``
    when any question of the batch has one (the synthetic set), else None.

    With a ``features`` store (samples carry ``feature_row``), ``visual_features`` replaces
    ``images``: one [U,C_s,H_s,W_s] tensor per stage, in the store's dtype (float16 halves the
    host-to-device copy; the datamodule casts after the transfer).

    With ``static_shapes`` every tensor is padded to those sizes and the batch gains
    ``question_valid`` [B] and ``image_valid`` [U] bool (True = real row; real rows first). A
    padding question is a copy of the last real one (tokens, image row, ids, answer type), so
    no block ever meets a question without a real token or image, and its ``targets`` row is
    zero; a padding image is a copy of the last real image. The host records keep the real
    rows only.
    """

    pad_token_id: int
    num_answers: int
    features: FeatureStore | None = None
    static_shapes: StaticShapes | None = None

    def __call__(self, samples: list[dict[str, Any] | None]) -> VQABatch:
        kept = [s for s in samples if s is not None]  # None: skipped unreadable image (logged)
        if not kept:
            raise DataError(
                f"all {len(samples)} samples of this batch have unreadable images",
                reason="corrupt_image",
            )
        ids = [torch.tensor(s["input_ids"], dtype=torch.long) for s in kept]
        lengths = torch.tensor([len(t) for t in ids])
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)
        visual_key = "image" if self.features is None else "feature_row"
        rows: dict[int, int] = {}  # image_id -> row in `images` / `visual_features`
        visuals, image_index = [], []
        for s in kept:
            if s["image_id"] not in rows:
                rows[s["image_id"]] = len(visuals)
                visuals.append(s[visual_key])
            image_index.append(rows[s["image_id"]])
        visual: dict[str, Any] = (
            {"images": torch.stack(visuals)}
            if self.features is None
            else {"visual_features": tuple(self.features.read(visuals))}
        )
        annotated: dict[str, Any] = {}
        if "answers" in kept[0]:
            counts = torch.tensor([len(s["target_index"]) for s in kept])
            target_rows = torch.repeat_interleave(torch.arange(len(kept)), counts)
            cols = torch.tensor([i for s in kept for i in s["target_index"]], dtype=torch.long)
            scores = torch.tensor([v for s in kept for v in s["target_score"]], dtype=torch.float32)
            targets = torch.zeros(len(kept), self.num_answers, dtype=torch.float32)
            targets[target_rows, cols] = scores
            annotated = {
                "targets": targets,
                "answer_type_id": torch.tensor(
                    [ANSWER_TYPE_INDEX[s["answer_type"]] for s in kept], dtype=torch.long
                ),
                "answers": tuple(tuple(s["answers"]) for s in kept),
            }
        families = tuple(s.get("question_family") for s in kept)
        batch = VQABatch(
            input_ids=input_ids,
            attention_mask=(torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
            image_index=torch.tensor(image_index, dtype=torch.long),
            question_id=torch.tensor([s["question_id"] for s in kept], dtype=torch.long),
            image_id=torch.tensor([s["image_id"] for s in kept], dtype=torch.long),
            question=tuple(s["question"] for s in kept),
            question_type=tuple(s["question_type"] for s in kept),
            answer_type=tuple(s["answer_type"] for s in kept),
            question_family=families if any(f is not None for f in families) else None,
            **visual,
            **annotated,
        )
        if self.static_shapes is None:
            return batch
        return pad_to_static_shapes(batch, self.static_shapes, self.pad_token_id)


def _repeat_last(rows: Tensor, total: int) -> Tensor:
    """``rows`` followed by copies of its last row, ``total`` rows in all."""
    if len(rows) == total:
        return rows
    return torch.cat([rows, rows[-1:].expand(total - len(rows), *rows.shape[1:])])


def pad_to_static_shapes(batch: VQABatch, shapes: StaticShapes, pad_token_id: int) -> VQABatch:
    """A collated batch padded to ``shapes`` (see :class:`VQACollator`)."""
    questions, tokens = batch.input_ids.shape
    images = len(batch.images) if batch.images is not None else len(batch.visual_features[0])
    for name, count, what in (
        ("questions", questions, "questions"),
        ("images", images, "distinct images"),
        ("tokens", tokens, "tokens in its longest question"),
    ):
        limit = getattr(shapes, name)
        if count > limit:
            raise DataError(
                f"a batch has {count} {what} but data.static_shapes.{name}={limit}: "
                f"raise data.static_shapes.{name} to at least {count}",
                reason="static_shapes",
            )
    b, u, n = shapes.questions, shapes.images, shapes.tokens
    padded: dict[str, Any] = {
        "input_ids": _repeat_last(F.pad(batch.input_ids, (0, n - tokens), value=pad_token_id), b),
        "attention_mask": _repeat_last(F.pad(batch.attention_mask, (0, n - tokens)), b),
        "image_index": _repeat_last(batch.image_index, b),
        "question_id": _repeat_last(batch.question_id, b),
        "image_id": _repeat_last(batch.image_id, b),
        "question_valid": torch.arange(b) < questions,
        "image_valid": torch.arange(u) < images,
    }
    if batch.targets is not None:
        targets = batch.targets
        padded["targets"] = torch.cat([targets, targets.new_zeros(b - questions, targets.shape[1])])
    if batch.answer_type_id is not None:
        padded["answer_type_id"] = _repeat_last(batch.answer_type_id, b)
    if batch.images is not None:
        padded["images"] = _repeat_last(batch.images, u)
    else:
        padded["visual_features"] = tuple(_repeat_last(stage, u) for stage in batch.visual_features)
    return dataclasses.replace(batch, **padded)
