"""Bad input: each defect raises an error naming file, record and field, or, with
``on_bad_record="skip"``, is skipped and counted by reason. Nothing is lost silently."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from vqa.data.collate import VQACollator
from vqa.data.dataset import VQADataset
from vqa.data.errors import BadRecordLog, DataError
from vqa.data.images import build_transform, load_rgb
from vqa.data.layout import SplitLayout, split_layout
from vqa.data.shapes import ShapesConfig, generate
from vqa.data.vqav2 import load_vqav2_split

QUESTIONS_PER_IMAGE = 3
CONFIG = ShapesConfig(4, 2, 1, QUESTIONS_PER_IMAGE, 40, 11)
TOTAL = 4 * QUESTIONS_PER_IMAGE  # train2014 questions
FIRST_QID = 1000  # image 1, question 0


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "root"
    generate(root, CONFIG)
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "root"))


def edit(path: Path, key: str, change: Callable[[list[dict[str, Any]]], None]) -> None:
    payload = json.loads(path.read_text())
    change(payload[key])
    path.write_text(json.dumps(payload))


def by_qid(records: list[dict[str, Any]], qid: int) -> dict[str, Any]:
    return next(r for r in records if r["question_id"] == qid)


# A defect damages question `qid` (or its image) and returns the question_id the error names.
def drop_annotation(layout: SplitLayout, qid: int) -> int:
    edit(layout.annotations, "annotations", lambda a: a.remove(by_qid(a, qid)))
    return qid


def nine_answers(layout: SplitLayout, qid: int) -> int:
    edit(layout.annotations, "annotations", lambda a: by_qid(a, qid)["answers"].pop())
    return qid


def empty_question(layout: SplitLayout, qid: int) -> int:
    edit(layout.questions, "questions", lambda q: by_qid(q, qid).update(question="   "))
    return qid


def missing_image(layout: SplitLayout, qid: int) -> int:
    layout.image_path(qid // 1000).unlink()  # every question of that image loses its image
    return qid


def string_image_id(layout: SplitLayout, qid: int) -> int:
    edit(layout.questions, "questions", lambda q: by_qid(q, qid).update(image_id=str(qid // 1000)))
    return qid


def orphan_annotation(layout: SplitLayout, qid: int) -> int:
    edit(
        layout.annotations,
        "annotations",
        lambda a: a.append({**by_qid(a, qid), "question_id": 999_999}),
    )
    return 999_999


def duplicate_question(layout: SplitLayout, qid: int) -> int:
    edit(layout.questions, "questions", lambda q: q.append(dict(by_qid(q, qid))))
    return qid


def unknown_answer_type(layout: SplitLayout, qid: int) -> int:
    edit(layout.annotations, "annotations", lambda a: by_qid(a, qid).update(answer_type="colour"))
    return qid


def image_id_mismatch(layout: SplitLayout, qid: int) -> int:
    edit(
        layout.annotations, "annotations", lambda a: by_qid(a, qid).update(image_id=qid // 1000 + 1)
    )
    return qid


# (defect, reason, field, file the error names, original questions lost in skip mode, the
# question it damages when all defects are applied together). A duplicate question or an
# orphan annotation is an extra record: counted, but no original question is lost.
DEFECTS = [
    (drop_annotation, "missing_annotation", "annotations", "annotations", 1, 1000),
    (nine_answers, "wrong_answer_count", "answers", "annotations", 1, 1001),
    (empty_question, "empty_question", "question", "questions", 1, 1002),
    (missing_image, "missing_image", "image_path", "image", QUESTIONS_PER_IMAGE, 4000),
    (string_image_id, "malformed_record", "image_id", "questions", 1, 2000),
    (orphan_annotation, "annotation_without_question", "question_id", "annotations", 0, 2001),
    (duplicate_question, "duplicate_question_id", "question_id", "questions", 0, 2001),
    (unknown_answer_type, "bad_answer_type", "answer_type", "annotations", 1, 2002),
    (image_id_mismatch, "image_id_mismatch", "image_id", "annotations", 1, 3000),
]


@pytest.mark.parametrize(
    ("defect", "reason", "field", "file", "lost", "_"), DEFECTS, ids=[d[1] for d in DEFECTS]
)
def test_defect_raises_naming_file_record_field_or_is_counted_when_skipping(
    root: Path, defect: Callable, reason: str, field: str, file: str, lost: int, _: int
) -> None:
    layout = split_layout(root, "train2014")
    qid = defect(layout, FIRST_QID)
    named_file = {
        "questions": layout.questions,
        "annotations": layout.annotations,
        "image": layout.image_path(1),
    }[file]

    with pytest.raises(DataError) as info:
        load_vqav2_split(root, "train2014", BadRecordLog("error"))
    err = info.value
    assert (err.reason, err.field, err.question_id) == (reason, field, qid)
    assert err.file is not None and err.file.name == named_file.name
    assert (
        named_file.name in str(err)
        and f"question_id={qid}" in str(err)
        and f"field '{field}'" in str(err)
    )

    bad = BadRecordLog("skip")
    table = load_vqav2_split(root, "train2014", bad).table
    assert bad.counts == {reason: max(lost, 1)}
    assert len(table) == TOTAL - lost
    if lost == 1:
        assert qid not in table["question_id"]


def test_all_defects_at_once_are_each_counted(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = split_layout(root, "train2014")
    for defect, _, _, _, _, qid in DEFECTS:
        defect(layout, qid)
    bad = BadRecordLog("skip")
    with caplog.at_level(logging.WARNING, logger="vqa.data.errors"):
        table = load_vqav2_split(root, "train2014", bad).table
    assert bad.counts == {reason: max(lost, 1) for _, reason, _, _, lost, _ in DEFECTS}
    assert sorted(table["question_id"]) == [2001, 3001, 3002]  # the only untouched questions
    assert f"{bad.total} skipped" in caplog.text
    assert "missing_image=3" in caplog.text


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_truncated_json_always_raises_naming_the_file(root: Path, mode: str) -> None:
    path = split_layout(root, "train2014").annotations
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        DataError, match=r"v2_mscoco_train2014_annotations\.json.*malformed JSON.*truncated"
    ):
        load_vqav2_split(root, "train2014", BadRecordLog(mode))


def test_missing_or_misshapen_files_name_the_file(root: Path) -> None:
    split_layout(root, "val2014").annotations.unlink()
    with pytest.raises(
        DataError, match=r"v2_mscoco_val2014_annotations\.json.*not found.*official VQA v2 layout"
    ):
        load_vqav2_split(root, "val2014")
    split_layout(root, "train2014").questions.write_text(json.dumps({"data": []}))
    with pytest.raises(DataError, match=r"train2014_questions\.json.*field 'questions'"):
        load_vqav2_split(root, "train2014")


def test_on_bad_record_must_be_known() -> None:
    with pytest.raises(ValueError, match="on_bad_record"):
        BadRecordLog("ignore")  # type: ignore[arg-type]


def corrupt_images(layout: SplitLayout) -> tuple[Path, Path]:
    garbage, truncated = layout.image_path(1), layout.image_path(2)
    garbage.write_bytes(b"definitely not an image")
    truncated.write_bytes(truncated.read_bytes()[:300])
    return garbage, truncated


def test_corrupt_and_truncated_images_raise_naming_file_and_question(root: Path) -> None:
    garbage, truncated = corrupt_images(split_layout(root, "train2014"))
    for path in (garbage, truncated):
        with pytest.raises(DataError, match=rf"{path.name}.*question_id=5.*cannot decode") as info:
            load_rgb(path, question_id=5)
        assert info.value.reason == "corrupt_image"
    table = load_vqav2_split(root, "train2014").table  # records are fine: decoding is lazy
    encoding = Dataset.from_dict(
        {
            "input_ids": [[2, 3]] * len(table),
            "target_index": [[]] * len(table),
            "target_score": [[]] * len(table),
        }
    )
    dataset = VQADataset(
        table, encoding, build_transform(32), annotated=True, on_bad_record="error"
    )
    with pytest.raises(
        DataError,
        match=rf"{garbage.name}: question_id={table['question_id'][0]}: field 'image_path'",
    ):
        dataset[0]


def test_skip_mode_drops_unreadable_images_from_the_batch_with_a_warning(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage, truncated = corrupt_images(split_layout(root, "train2014"))
    table = load_vqav2_split(root, "train2014").table
    encoding = Dataset.from_dict(
        {
            "input_ids": [[2, 3]] * len(table),
            "target_index": [[0]] * len(table),
            "target_score": [[1.0]] * len(table),
        }
    )
    dataset = VQADataset(table, encoding, build_transform(32), annotated=True, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="vqa.data.dataset"):
        samples = [dataset[i] for i in range(len(dataset))]
    assert sum(s is None for s in samples) == 2 * QUESTIONS_PER_IMAGE
    assert garbage.name in caplog.text and truncated.name in caplog.text
    batch = VQACollator(pad_token_id=0, num_answers=1)(samples)
    good = [
        qid
        for qid, image_id in zip(table["question_id"], table["image_id"], strict=True)
        if image_id > 2
    ]
    assert batch.question_id.tolist() == good
    assert batch.image_index.shape[0] == batch.targets.shape[0] == len(good)
    good_images = {i for i in table["image_id"] if i > 2}
    assert batch.images.shape[0] == len(good_images)  # each readable image stored once
    with pytest.raises(DataError, match="unreadable"):
        VQACollator(pad_token_id=0, num_answers=1)([None, None])
    assert torch.isfinite(batch.images).all()
