"""The split table every data source produces, and the record checks they share.

One row per question, joined with its annotation::

    question_id, image_id, question, image_path, question_type, answer_type,
    answers (the ten raw human answers), multiple_choice_answer, question_family

``question_family`` is not a VQA v2 field: the synthetic set's annotations carry it (the
template that wrote the question, :func:`vqa.data.shapes.family_of`); it is None elsewhere.
In unannotated splits (VQA v2's test splits) the annotation columns hold "" and []. A source
whose images live inside the table (a hub dataset) has an ``image`` column instead of
``image_path``.
"""

from __future__ import annotations

from collections.abc import Mapping
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
) -> dict[str, Any]:
    """Validate one question (and its annotation) and return its table row minus the image.

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
    if not annotated:
        return row
    if not isinstance(annotation, Mapping):
        raise bad(
            "no annotation for this question", annotations_file, "annotations", "missing_annotation"
        )
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
    return row
