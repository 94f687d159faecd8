"""The split table every data source produces, and the record checks they share.

One row per question, joined with its annotation::

    question_id, image_id, question, image_path, question_type, answer_type,
    answers (the ten raw human answers), multiple_choice_answer, question_family

``question_family`` is not a VQA v2 field: the synthetic set's annotations carry it (the
template that wrote the question, :func:`vqa.data.shapes.family_of`); it is None elsewhere.
In unannotated splits (VQA v2's test splits) the annotation columns hold "" and []. A source
whose images live inside the table (a hub dataset) has an ``image`` column instead of
``image_path``.

Data with several images per question (``streams``: the names of a question record's
``image_ids``) adds ``image_ids`` and ``image_paths``, one entry per stream in stream order;
``image_id``/``image_path`` are then the first stream's. Data read with
``conditioning_fields`` adds ``conditioning``: each field's string value (None where the record
has none), in field order. Without either the table is exactly the single-image one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value

from vqa.data.errors import DataError

NUM_HUMAN_ANSWERS = 10
ANSWER_TYPES = frozenset({"yes/no", "number", "other"})

FEATURES = Features(
    {
        "question_id": Value("int64"),
        "image_id": Value("int64"),
        "question": Value("string"),
        "image_path": Value("string"),
        "question_type": Value("string"),
        "answer_type": Value("string"),
        "answers": List(Value("string")),
        "multiple_choice_answer": Value("string"),
        "question_family": Value("string"),  # None where the annotation has none (VQA v2)
    }
)

STREAM_FEATURES = Features(
    {"image_ids": List(Value("int64")), "image_paths": List(Value("string"))}
)
CONDITIONING_FEATURES = Features({"conditioning": List(Value("string"))})


def table_features(
    base: Features, *, streams: bool = False, conditioning: bool = False
) -> Features:
    """``base`` (:data:`FEATURES`) with the stream and conditioning columns that are in use."""
    features = base.copy()
    if streams:
        features.update(STREAM_FEATURES)
    if conditioning:
        features.update(CONDITIONING_FEATURES)
    return features


def check_names(names: Sequence[str] | None, what: str) -> list[str] | None:
    """A config's list of stream or field names: None, or distinct non-empty strings."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"{what} must be a list of names or null, got {names!r}")
    names = list(names)
    if (
        not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) < len(names)
    ):
        raise ValueError(f"{what} must be a non-empty list of distinct names, got {names!r}")
    return names


@dataclass
class SplitTable:
    """A loaded split: the rows, whether they are annotated, and a content key.

    ``fingerprint`` changes whenever the kept rows change, so caches derived from the table
    (tokenisation, targets) are keyed by it.
    """

    split: str
    table: Dataset
    annotated: bool
    fingerprint: str


def column(table: Dataset, name: str) -> list[Any]:
    """A whole column as a list, read in one Arrow batch (iterating ``table[name]`` formats one
    row at a time: ~100x slower on VQA v2's 443k questions)."""
    return table.select_columns(name)[:][name]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_row(
    question: Any,
    annotation: Any,
    *,
    annotated: bool,
    questions_file: str | Path,
    annotations_file: str | Path | None,
    streams: Sequence[str] | None = None,
    conditioning_fields: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Validate one question (and its annotation) and return its table row minus the image.

    With ``streams`` the row's ``image_ids`` are the record's ``image_ids`` of those streams, in
    order, and its ``image_id`` the first of them (a question lacking a stream is a bad record,
    reason ``missing_stream``); with ``conditioning_fields`` its ``conditioning`` holds each
    field's value (None where the record has no value).

    Raises :class:`DataError` naming the file, question_id and field of the first problem; its
    ``reason`` is the tag counted when bad records are skipped.
    """

    def bad(message: str, file: str | Path | None, field: str, reason: str) -> DataError:
        return DataError(message, file=file, question_id=qid, field=field, reason=reason)

    qid = question.get("question_id") if isinstance(question, Mapping) else None
    qid = qid if is_int(qid) else None
    if not isinstance(question, Mapping):
        raise bad(
            "question record is not a JSON object", questions_file, "questions", "malformed_record"
        )
    if qid is None:
        raise bad(
            "missing or non-integer question_id", questions_file, "question_id", "malformed_record"
        )
    if not is_int(question.get("image_id")):
        raise bad("missing or non-integer image_id", questions_file, "image_id", "malformed_record")
    text = question.get("question")
    if not isinstance(text, str):
        raise bad("missing or non-string question", questions_file, "question", "malformed_record")
    if not text.strip():
        raise bad("empty question", questions_file, "question", "empty_question")
    row = {
        "question_id": qid,
        "image_id": question["image_id"],
        "question": text.strip(),
        "question_type": "",
        "answer_type": "",
        "answers": [],
        "multiple_choice_answer": "",
        "question_family": None,
    }
    if streams is not None:
        row["image_ids"] = _stream_image_ids(question, streams, questions_file, qid)
    if conditioning_fields is not None:
        row["conditioning"] = _conditioning_values(
            question, conditioning_fields, questions_file, qid
        )
    if not annotated:
        return _first_stream_image(row)
    if not isinstance(annotation, Mapping):
        raise bad(
            "no annotation for this question", annotations_file, "annotations", "missing_annotation"
        )
    # The record's image_id: the first image of the data set, whichever streams are read.
    if annotation.get("image_id") != row["image_id"]:
        raise bad(
            f"annotation image_id {annotation.get('image_id')!r} != question image_id {row['image_id']}",
            annotations_file,
            "image_id",
            "image_id_mismatch",
        )
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not all(
        isinstance(a, Mapping) and isinstance(a.get("answer"), str) for a in answers
    ):
        raise bad(
            "expected a list of {answer: str, ...} objects",
            annotations_file,
            "answers",
            "malformed_answers",
        )
    if len(answers) != NUM_HUMAN_ANSWERS:
        raise bad(
            f"expected {NUM_HUMAN_ANSWERS} human answers, got {len(answers)}",
            annotations_file,
            "answers",
            "wrong_answer_count",
        )
    if annotation.get("answer_type") not in ANSWER_TYPES:
        raise bad(
            f"answer_type {annotation.get('answer_type')!r} not in {sorted(ANSWER_TYPES)}",
            annotations_file,
            "answer_type",
            "bad_answer_type",
        )
    for field in ("question_type", "multiple_choice_answer"):
        if not isinstance(annotation.get(field), str):
            raise bad(f"missing or non-string {field}", annotations_file, field, "malformed_record")
    family = annotation.get("question_family")
    if family is not None and not (isinstance(family, str) and family):
        raise bad(
            f"question_family must be a non-empty string when present, got {family!r}",
            annotations_file,
            "question_family",
            "malformed_record",
        )
    row.update(
        question_type=annotation["question_type"],
        answer_type=annotation["answer_type"],
        answers=[a["answer"] for a in answers],
        multiple_choice_answer=annotation["multiple_choice_answer"],
        question_family=family,
    )
    return _first_stream_image(row)


def _first_stream_image(row: dict[str, Any]) -> dict[str, Any]:
    """With streams, the row's image is its first selected stream's (``data.streams=[right]``
    reads the right images as the single-image data set of them)."""
    if "image_ids" in row:
        row["image_id"] = row["image_ids"][0]
    return row


def _stream_image_ids(
    question: Mapping[str, Any], streams: Sequence[str], file: str | Path, qid: int
) -> list[int]:
    by_stream = question.get("image_ids")
    if not isinstance(by_stream, Mapping):
        raise DataError(
            f"no image_ids object naming the image of each stream {list(streams)}",
            file=file,
            question_id=qid,
            field="image_ids",
            reason="missing_stream",
        )
    ids = []
    for stream in streams:
        if stream not in by_stream:
            raise DataError(
                f"no image for stream {stream!r} (image_ids has {sorted(by_stream)})",
                file=file,
                question_id=qid,
                field=f"image_ids.{stream}",
                reason="missing_stream",
            )
        if not is_int(by_stream[stream]):
            raise DataError(
                f"non-integer image id {by_stream[stream]!r}",
                file=file,
                question_id=qid,
                field=f"image_ids.{stream}",
                reason="malformed_record",
            )
        ids.append(by_stream[stream])
    return ids


def _conditioning_values(
    question: Mapping[str, Any], fields: Sequence[str], file: str | Path, qid: int
) -> list[str | None]:
    values = [question.get(field) for field in fields]
    for field, value in zip(fields, values, strict=True):
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"a conditioning field holds a string (a categorical label), got {value!r}",
                file=file,
                question_id=qid,
                field=field,
                reason="malformed_record",
            )
    return values
