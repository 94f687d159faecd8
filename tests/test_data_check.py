"""`python -m vqa.data.check DIR`: per-split summary, every image decoded, non-zero exit on problems."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from vqa.data.check import check_split, main
from vqa.data.layout import annotations_path, split_layout
from vqa.data.shapes import ShapesConfig, generate

CONFIG = ShapesConfig(5, 3, 2, 4, 40, 21)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("check") / "root"
    generate(root, CONFIG)
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "root"))


def row(output: str, split: str) -> list[str]:
    """The cells of a split's row in the printed table."""
    line = next(line for line in output.splitlines() if f" {split} " in line)
    return [cell.strip() for cell in re.split(r"[│|┃]", line) if cell.strip()]


def test_clean_root_passes_with_counts(pristine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(pristine), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    for split, questions, images in (("val2014", "12", "3"), ("test2015", "8", "2")):
        annotations = json.loads(split_layout(pristine, split).annotations.read_text())
        types = Counter(a["answer_type"] for a in annotations["annotations"])
        assert row(out, split) == [
            split,
            questions,
            images,
            str(types["yes/no"]),
            str(types["number"]),
            str(types["other"]),
            "none",
        ]
    assert row(out, "train2014")[:3] == ["train2014", "20", "5"]


def test_test_split_without_annotations_is_not_a_problem(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations_path(root, "test2015").unlink()  # the VQA v2 layout: no public test answers
    assert main([str(root)]) == 0
    assert row(capsys.readouterr().out, "test2015") == ["test2015", "8", "2", "0", "0", "0", "none"]


def test_broken_root_fails_and_names_every_problem(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = split_layout(root, "train2014")
    layout.image_path(1).write_bytes(b"\x89PNG not really")  # unreadable
    truncated = layout.image_path(2)
    truncated.write_bytes(truncated.read_bytes()[:200])  # a cut-off download
    payload = json.loads(layout.annotations.read_text())
    payload["annotations"][5]["answers"] = payload["annotations"][5]["answers"][:9]
    layout.annotations.write_text(json.dumps(payload))
    val = split_layout(root, "val2014").questions
    val.write_text(val.read_text()[:-40])  # truncated JSON

    assert main([str(root)]) == 1
    out = capsys.readouterr().out
    assert "corrupt_image=2" in out and "wrong_answer_count=1" in out
    assert "COCO_train2014_000000000001.jpg" in out and "COCO_train2014_000000000002.jpg" in out
    assert "malformed_json=1" in out and "v2_OpenEnded_mscoco_val2014_questions.json" in out
    assert row(out, "train2014")[1:3] == ["19", "5"]  # 20 questions minus the one with 9 answers
    assert row(out, "test2015")[-1] == "none"


def test_grayscale_and_png_content_are_not_problems(root: Path) -> None:
    from PIL import Image

    layout = split_layout(root, "train2014")
    Image.open(layout.image_path(1)).convert("L").save(layout.image_path(1), format="JPEG")
    Image.open(layout.image_path(2)).save(layout.image_path(2), format="PNG")
    report = check_split(root, "train2014", workers=1, progress=False)
    assert report.problems.total == 0 and report.images == 5


def test_not_a_vqa_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    assert "not a VQA v2 layout" in capsys.readouterr().out
