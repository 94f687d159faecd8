"""Batch assembly: pad questions to the longest in the batch (or to fixed static shapes),
densify the soft targets, keep each distinct image once, map conditioning values to ids."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
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
UNKNOWN_CONDITIONING = 0  # the index of a value missing (None) or not in the vocabulary

ConditioningVocab = Mapping[str, Sequence[str]]


def conditioning_index(vocab: ConditioningVocab) -> dict[str, dict[str, int]]:
    """Per field, value -> index: 1 + its position in the field's list (0 is the unknown)."""
    return {field: {v: i + 1 for i, v in enumerate(values)} for field, values in vocab.items()}


def build_conditioning_vocab(
    fields: Sequence[str], values: Sequence[Sequence[str | None]]
) -> dict[str, list[str]]:
    """Per field (in order), the sorted distinct values of ``values`` (one sequence per
    question, in field order); None, a missing value, is no value of the vocabulary."""
    return {
        field: sorted({v[position] for v in values if v[position] is not None})
        for position, field in enumerate(fields)
    }


def unknown_conditioning_values(
    vocab: ConditioningVocab, values: Sequence[Sequence[str | None]]
) -> dict[str, list[str | None]]:
    """Per field, the value of every question whose value maps to the unknown index (None,
    or a value the vocabulary lacks), in question order."""
    index = conditioning_index(vocab)
    return {
        field: [v[position] for v in values if v[position] not in known]
        for position, (field, known) in enumerate(index.items())
    }


def conditioning_ids(
    index: Sequence[Mapping[str, int]], values: Sequence[Sequence[str | None]]
) -> Tensor:
    """[len(values), F] long: each question's value per field mapped by ``index`` (one value ->
    id mapping per field, :func:`conditioning_index`), 0 (the unknown) for None or an unseen
    value. The one mapping of labels to ids: the collator's and the Predictor's."""
    ids = [
        [known.get(v, UNKNOWN_CONDITIONING) for known, v in zip(index, row, strict=True)]
        for row in values
    ]
    return torch.tensor(ids, dtype=torch.long).view(len(ids), len(index))


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

    Samples with several images per question (``image_ids`` and, per stream, ``images`` or
    ``feature_rows``) keep each distinct image of all streams once, and ``image_index`` is
    [B, K], column k the row of each question's stream-k image; with a single stream it stays
    [B], so that one stream of a set is exactly the single-image data set of its images. With a
    ``conditioning_vocab`` ({field: known values}, fields in the samples' ``conditioning``
    order) the batch carries ``conditioning_ids`` [B, F] long
    (:data:`UNKNOWN_CONDITIONING` for None or an unseen value, else 1 + the value's position).

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
    conditioning_vocab: ConditioningVocab | None = None

    @cached_property
    def _conditioning_index(self) -> list[dict[str, int]]:
        """value -> index per field, in field order (built once per collator and worker)."""
        return list(conditioning_index(self.conditioning_vocab or {}).values())

    def _image_rows(self, kept: list[dict[str, Any]]) -> tuple[list[Any], Tensor]:
        """Each distinct image once (pixels or feature row) and each question's row of it:
        [B], or [B, K] for questions with several (a single stream stays [B])."""
        streams = "image_ids" in kept[0]
        if self.features is None:
            visual_key = "images" if streams else "image"
        else:
            visual_key = "feature_rows" if streams else "feature_row"
        rows: dict[int, int] = {}  # image_id -> row in `images` / `visual_features`
        visuals, image_index = [], []
        for s in kept:
            if streams:
                shown = list(zip(s["image_ids"], s[visual_key], strict=True))
            else:
                shown = [(s["image_id"], s[visual_key])]
            question_rows = []
            for image_id, visual in shown:
                if image_id not in rows:
                    rows[image_id] = len(visuals)
                    visuals.append(visual)
                question_rows.append(rows[image_id])
            image_index.append(question_rows if len(question_rows) > 1 else question_rows[0])
        return visuals, torch.tensor(image_index, dtype=torch.long)

    def _conditioning_ids(self, kept: list[dict[str, Any]]) -> Tensor:
        index = self._conditioning_index
        for s in kept:
            if len(s["conditioning"]) != len(index):
                raise ValueError(
                    f"a sample has {len(s['conditioning'])} conditioning values but the "
                    f"vocabulary {len(index)} fields ({list(self.conditioning_vocab or {})})"
                )
        return conditioning_ids(index, [s["conditioning"] for s in kept])

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
        visuals, image_index = self._image_rows(kept)
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
        conditioning: dict[str, Any] = {}
        if self.conditioning_vocab is not None:
            conditioning["conditioning_ids"] = self._conditioning_ids(kept)
        families = tuple(s.get("question_family") for s in kept)
        batch = VQABatch(
            input_ids=input_ids,
            attention_mask=(torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
            image_index=image_index,
            question_id=torch.tensor([s["question_id"] for s in kept], dtype=torch.long),
            image_id=torch.tensor([s["image_id"] for s in kept], dtype=torch.long),
            question=tuple(s["question"] for s in kept),
            question_type=tuple(s["question_type"] for s in kept),
            answer_type=tuple(s["answer_type"] for s in kept),
            question_family=families if any(f is not None for f in families) else None,
            **visual,
            **annotated,
            **conditioning,
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
    if batch.image_index.dim() != 1 or batch.conditioning_ids is not None:
        raise ValueError(
            "data.static_shapes does not support several images per question (data.streams) "
            "or conditioning fields (data.conditioning_fields) yet: set data.static_shapes=null"
        )
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
