"""Load one split of the official VQA v2 files into a :class:`datasets.Dataset`.

Questions and annotations are joined by question_id, every record is checked (cheaply: fields,
ten answers, image file present), and each problem is raised or counted according to the
``on_bad_record`` policy. Decoding the images is left to training time and to
``python -m vqa.data.check``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from vqa.data.errors import BadRecordLog, DataError
from vqa.data.layout import split_layout
from vqa.data.table import (
    FEATURES,
    SplitTable,
    build_row,
    check_names,
    is_int,
    table_features,
)

LOADER_VERSION = "1"


def read_records(path: Path, key: str) -> list[Any]:
    """The ``key`` list of a VQA JSON file; a missing, malformed or truncated file always raises
    (no record of it can be trusted, so skipping cannot apply)."""
    try:
        with path.open(encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError as err:
        raise DataError(
            "file not found; expected the official VQA v2 layout "
            "(Questions/, Annotations/, Images/mscoco/<subtype>/) under the data root",
            file=path,
            reason="missing_file",
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(
            f"malformed JSON ({err}); the file may be truncated: download it again",
            file=path,
            reason="malformed_json",
        ) from err
    records = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(records, list):
        raise DataError(
            f"expected a top-level object with a '{key}' list",
            file=path,
            field=key,
            reason="malformed_json",
        )
    return records


def _index_annotations(path: Path, bad: BadRecordLog) -> dict[int, Any]:
    """question_id -> annotation record; records without a usable or unique id are bad."""
    index: dict[int, Any] = {}
    for record in read_records(path, "annotations"):
        qid = record.get("question_id") if isinstance(record, dict) else None
        if not is_int(qid):
            bad.handle(
                DataError(
                    "annotation without an integer question_id",
                    file=path,
                    field="question_id",
                    reason="malformed_record",
                )
            )
        elif qid in index:
            bad.handle(
                DataError(
                    "duplicate annotation",
                    file=path,
                    question_id=qid,
                    field="question_id",
                    reason="duplicate_question_id",
                )
            )
        else:
            index[qid] = record
    return index


def load_vqav2_split(
    root: str | Path,
    split: str,
    bad: BadRecordLog | None = None,
    *,
    streams: Sequence[str] | None = None,
    conditioning_fields: Sequence[str] | None = None,
) -> SplitTable:
    """Join, validate and tabulate ``split`` (train2014, val2014, test-dev2015, test2015).

    ``streams``: read each question's ``image_ids`` of these streams (several images per
    question; every one must name an existing image file); ``conditioning_fields``: read these
    question-record keys as categorical labels. See :mod:`vqa.data.table` for the columns.
    """
    bad = bad if bad is not None else BadRecordLog("error")
    streams = check_names(streams, "streams")
    conditioning_fields = check_names(conditioning_fields, "conditioning_fields")
    layout = split_layout(Path(root).resolve(), split)  # absolute image paths, resolved once
    questions = read_records(layout.questions, "questions")
    annotated = layout.annotations is not None
    annotations = (
        _index_annotations(layout.annotations, bad) if layout.annotations is not None else {}
    )

    columns: dict[str, list[Any]] = defaultdict(list)
    image_exists: dict[int, bool] = {}
    seen: set[int] = set()
    # A content key over everything kept, so derived caches follow edits and skip decisions.
    header = f"{LOADER_VERSION}|{split}"
    if streams is not None or conditioning_fields is not None:  # else: as before they existed
        header += f"|streams={streams}|conditioning={conditioning_fields}"
    digest = hashlib.blake2b(header.encode(), digest_size=16)

    def image_path(image_id: int, qid: int | None) -> str:
        path = layout.image_path(image_id)
        if image_id not in image_exists:
            image_exists[image_id] = os.path.isfile(path)
        if not image_exists[image_id]:
            raise DataError(
                "image file not found",
                file=path,
                question_id=qid,
                field="image_path",
                reason="missing_image",
            )
        return str(path)

    for record in questions:
        qid = record.get("question_id") if isinstance(record, dict) else None
        qid = qid if is_int(qid) else None
        try:
            if qid in seen:
                raise DataError(
                    "duplicate question",
                    file=layout.questions,
                    question_id=qid,
                    field="question_id",
                    reason="duplicate_question_id",
                )
            if qid is not None:
                seen.add(qid)
            row = build_row(
                record,
                annotations.pop(qid, None),
                annotated=annotated,
                questions_file=layout.questions,
                annotations_file=layout.annotations,
                streams=streams,
                conditioning_fields=conditioning_fields,
            )
            path = image_path(row["image_id"], qid)
            if streams is not None:
                row["image_paths"] = [image_path(i, qid) for i in row["image_ids"]]
        except DataError as err:
            bad.handle(err)
            continue
        row["image_path"] = path
        for key, value in row.items():
            columns[key].append(value)
        digest.update(repr(sorted(row.items())).encode())
    for qid in annotations:  # left over: no question refers to them
        bad.handle(
            DataError(
                "annotation without a question",
                file=layout.annotations,
                question_id=qid,
                field="question_id",
                reason="annotation_without_question",
            )
        )

    features = table_features(
        FEATURES, streams=streams is not None, conditioning=conditioning_fields is not None
    )
    table = Dataset.from_dict({name: columns[name] for name in features}, features=features)
    bad.report(f"{layout.questions.parent.parent} {split}")
    return SplitTable(split=split, table=table, annotated=annotated, fingerprint=digest.hexdigest())
