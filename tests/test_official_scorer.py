"""Offline evaluator: official report format, agreement with VQAAccuracy, input errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vqa.metrics import VQAAccuracy
from vqa.official_scorer import EvaluationError, evaluate_results, main

REPO_ROOT = Path(__file__).resolve().parents[1]

CANONICAL = {"yes/no": ["yes", "no"], "number": ["2", "3", "4"], "other": ["red", "blue", "circle"]}
# Variants that normalise to the canonical answer under the official rules.
VARIANTS = {
    "yes": ["Yes", "yes.", "Yes!"],
    "no": ["No", "no."],
    "2": ["two", "Two"],
    "3": ["three"],
    "4": ["four."],
    "red": ["Red!", "red."],
    "blue": ["a blue", "Blue"],
    "circle": ["the circle", "Circle."],
}
QUESTION_TYPES = {
    "yes/no": ["is there a", "is the"],
    "number": ["how many"],
    "other": ["what color is the", "what shape is"],
}


def _noisy_answer(rng: random.Random, answer_type: str, canonical: str) -> str:
    roll = rng.random()
    if roll < 0.55:
        return canonical
    if roll < 0.8:
        return rng.choice(VARIANTS[canonical])
    return rng.choice(CANONICAL[answer_type])


def _write_split(tmp_path: Path, n: int = 80, seed: int = 0) -> dict[str, Path]:
    """Random VQA v2-format annotations/questions/results with annotator and model noise."""
    rng = random.Random(seed)
    annotations, questions, results = [], [], []
    for i in range(n):
        qid, image_id = 1000 + 7 * i, 50 + i // 3
        answer_type = rng.choice(list(CANONICAL))
        canonical = rng.choice(CANONICAL[answer_type])
        if i % 9 == 0:  # the official quirk: ten identical raw answers are not normalised
            humans = ["Yes."] * 10
        else:
            humans = [_noisy_answer(rng, answer_type, canonical) for _ in range(10)]
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": rng.choice(QUESTION_TYPES[answer_type]),
                "answer_type": answer_type,
                "multiple_choice_answer": canonical,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                    for j, a in enumerate(humans)
                ],
            }
        )
        questions.append({"question_id": qid, "image_id": image_id, "question": f"q{i}?"})
        results.append({"question_id": qid, "answer": _noisy_answer(rng, answer_type, canonical)})
    rng.shuffle(results)  # result order must not matter
    paths = {
        "annotations": tmp_path / "annotations.json",
        "questions": tmp_path / "questions.json",
        "results": tmp_path / "results.json",
    }
    paths["annotations"].write_text(json.dumps({"annotations": annotations}))
    paths["questions"].write_text(json.dumps({"questions": questions}))
    paths["results"].write_text(json.dumps(results))
    return paths


def _argv(paths: dict[str, Path]) -> list[str]:
    return [arg for key, path in paths.items() for arg in (f"--{key}", str(path))]


@pytest.fixture
def split(tmp_path: Path) -> dict[str, Path]:
    return _write_split(tmp_path)


def test_cli_and_metric_agree(split: dict[str, Path], tmp_path: Path, capsys) -> None:
    per_question_file = tmp_path / "per_question.json"
    assert main([*_argv(split), "--per-question", str(per_question_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = evaluate_results(split["annotations"], split["questions"], split["results"])
    assert printed == report.official()
    assert 20 < printed["overall"] < 90  # the noise makes this a non-trivial score
    per_question = {int(k): v for k, v in json.loads(per_question_file.read_text()).items()}
    assert per_question == report.per_question

    annotations = json.loads(split["annotations"].read_text())["annotations"]
    answers = {r["question_id"]: r["answer"] for r in json.loads(split["results"].read_text())}
    metric = VQAAccuracy(question_types=sorted({a["question_type"] for a in annotations}))
    batches = [annotations[i : i + 16] for i in range(0, len(annotations), 16)]
    for batch in [*batches, annotations[:5]]:  # plus a sampler-style padded repeat
        metric.update(
            predictions=[answers[a["question_id"]] for a in batch],
            human_answers=[[h["answer"] for h in a["answers"]] for a in batch],
            question_ids=[a["question_id"] for a in batch],
            answer_types=[a["answer_type"] for a in batch],
            question_types=[a["question_type"] for a in batch],
        )
    computed = {k: 100 * v.item() for k, v in metric.compute().items()}

    assert computed.pop("overall") == pytest.approx(report.overall, abs=1e-9)
    for name, value in report.per_answer_type.items():
        assert computed.pop(name) == pytest.approx(value, abs=1e-9), name
    for name, value in report.per_question_type.items():
        assert computed.pop(f"question_type/{name}") == pytest.approx(value, abs=1e-9), name
    assert computed == {}  # nothing reported by one side only
    metric_per_question = metric.per_question()
    assert metric_per_question.keys() == per_question.keys()
    for qid, percent in per_question.items():
        assert 100 * metric_per_question[qid] == pytest.approx(percent, abs=1e-9)


def test_hand_computed_report() -> None:
    def ann(qid: int, qtype: str, atype: str, answers: list[str]) -> dict:
        return {
            "question_id": qid,
            "question_type": qtype,
            "answer_type": atype,
            "answers": [{"answer": a, "answer_id": j} for j, a in enumerate(answers)],
        }

    annotations = {
        "annotations": [
            ann(1, "is the", "yes/no", ["Yes."] * 10),  # "yes" vs ten "Yes." -> 0 (quirk)
            ann(2, "how many", "number", ["2"] * 2 + ["3"] * 8),  # "two" -> 0.6
            ann(3, "is the", "yes/no", ["no"] * 3 + ["yes"] * 7),  # "No!" -> 0.9
        ]
    }
    questions = {"questions": [{"question_id": q} for q in (1, 2, 3)]}
    results = [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 2, "answer": "two"},
        {"question_id": 3, "answer": "No!"},
    ]
    report = evaluate_results(annotations, questions, results)
    assert report.per_question == pytest.approx({1: 0.0, 2: 60.0, 3: 90.0})
    assert report.overall == pytest.approx(50.0)
    assert report.official() == {
        "overall": 50.0,
        "perAnswerType": {"yes/no": 45.0, "number": 60.0},
        "perQuestionType": {"is the": 45.0, "how many": 60.0},
    }
    results[2]["answer"] = "yes"  # 7 matches -> 1.0; overall 160 / 3 = 53.333...
    assert evaluate_results(annotations, questions, results).official()["overall"] == 53.33


def _rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def test_mismatched_result_ids(split: dict[str, Path], capsys) -> None:
    def edit(results: list) -> list:
        return [*results[2:], {"question_id": 1, "answer": "yes"}]

    _rewrite(split["results"], edit)
    assert main(_argv(split)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "2 question ids missing" in captured.err and "1 extra" in captured.err
    assert "results.json" in captured.err


def test_duplicate_result_id(split: dict[str, Path], capsys) -> None:
    _rewrite(split["results"], lambda results: [*results, results[0]])
    assert main(_argv(split)) == 1
    assert "duplicate question_id" in capsys.readouterr().err


def test_malformed_json_names_the_file(split: dict[str, Path], capsys) -> None:
    split["questions"].write_text('{"questions": [')
    assert main(_argv(split)) == 1
    err = capsys.readouterr().err
    assert "questions.json" in err and "malformed" in err


def test_questions_must_match_annotations(split: dict[str, Path]) -> None:
    _rewrite(split["questions"], lambda q: {"questions": q["questions"][1:]})
    with pytest.raises(EvaluationError, match="1 question ids missing"):
        evaluate_results(split["annotations"], split["questions"], split["results"])


def test_bad_annotation_record_is_named(split: dict[str, Path]) -> None:
    def edit(data: dict) -> dict:
        del data["annotations"][3]["answers"]
        return data

    _rewrite(split["annotations"], edit)
    with pytest.raises(EvaluationError, match=r"annotations\[3\] \(question_id 1021\): 'answers'"):
        evaluate_results(split["annotations"], split["questions"], split["results"])


def test_missing_file_is_reported(split: dict[str, Path], tmp_path: Path, capsys) -> None:
    split["results"] = tmp_path / "nope.json"
    assert main(_argv(split)) == 1
    assert "nope.json" in capsys.readouterr().err


def test_module_entry_point(split: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vqa.official_scorer", *_argv(split)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == evaluate_results(**split).official()
