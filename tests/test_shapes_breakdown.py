"""Per-family scoring of results files on the synthetic set (scripts/shapes_breakdown.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.shapes_breakdown import main, prior_guesses
from vqa.data.layout import split_layout
from vqa.data.shapes import ShapesConfig, family_of, generate
from vqa.official_scorer import evaluate_results


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("breakdown") / "shapes"
    generate(root, ShapesConfig(30, 20, 0, questions_per_image=6, image_size=32, seed=4))
    return root


def test_scores_split_by_family(root: Path, tmp_path: Path) -> None:
    layout = split_layout(root, "val2014")
    questions = json.loads(layout.questions.read_text())["questions"]
    annotations = {
        a["question_id"]: a for a in json.loads(layout.annotations.read_text())["annotations"]
    }
    # Right on the counting families, a wrong-but-valid word everywhere else.
    results = [
        {
            "question_id": q["question_id"],
            "answer": annotations[q["question_id"]]["multiple_choice_answer"]
            if family_of(q["question"]).startswith("count")
            else "hexagon",
        }
        for q in questions
    ]
    (tmp_path / "run").mkdir()
    results_file = tmp_path / "run" / "v2_OpenEnded_mscoco_val2014_x_results.json"
    results_file.write_text(json.dumps(results))

    table = main(
        [f"counter={tmp_path / 'run'}", "--root", str(root), "--out", str(tmp_path / "t.md")]
    )

    header, _, row = table.splitlines()
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|"), strict=True))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert cells["run"] == "counter"
    assert float(cells["count_color"]) == float(cells["count_shape"]) == 100.0
    for family in ("exists", "relation", "color_of_shape", "shape_of_color", "color_beside"):
        assert float(cells[family]) == 0.0
    expected = evaluate_results(layout.annotations, layout.questions, results_file)
    assert float(cells["overall"]) == pytest.approx(expected.overall, abs=0.05)
    assert float(cells["number"]) == 100.0 and float(cells["yes/no"]) == 0.0
    assert (tmp_path / "t.md").read_text().strip() == table


def test_folder_needs_exactly_one_results_file(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="exactly one"):
        main([str(tmp_path), "--root", str(root)])


def test_priors_on_the_default_set_are_the_two_blind_floors(root: Path) -> None:
    _, _, *rows = main(["--priors", "--root", str(root)]).splitlines()
    assert [r.split("|")[1].strip() for r in rows] == ["question-only prior", "image-only prior"]
    guesses = prior_guesses(root, "val2014")
    assert list(guesses) == ["question-only prior", "image-only prior"]  # no variant's ceilings
    questions = json.loads(split_layout(root, "val2014").questions.read_text())["questions"]
    assert len({guesses["image-only prior"](q) for q in questions}) == 1
    by_text: dict[str, set[str]] = {}
    for q in questions:  # blind to the image: one answer per question text
        by_text.setdefault(q["question"], set()).add(guesses["question-only prior"](q))
    assert all(len(answers) == 1 for answers in by_text.values())
    assert len(set().union(*by_text.values())) > 1
