"""Offline VQA evaluator: scores an EvalAI-format results file like the official tool.

    python -m vqa.official_scorer --annotations A.json --questions Q.json --results R.json \
        [--per-question FILE]

Prints ``{"overall", "perAnswerType", "perQuestionType"}`` in percent rounded to 2 decimals,
exactly as ``VQAEval.setAccuracy`` reports them; the checkpoint evaluator calls
:func:`evaluate_results` directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqa.data.answers import vqa_accuracy

JsonSource = dict[str, Any] | list[Any] | str | Path


class EvaluationError(ValueError):
    """Input that cannot be scored; the message names the file, record and field."""


@dataclass
class EvalReport:
    """Unrounded accuracies in percent (the official tool's unit)."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[int, float]

    def official(self, ndigits: int = 2) -> dict[str, Any]:
        """The summary the official tool prints, rounded the same way."""
        return {
            "overall": round(self.overall, ndigits),
            "perAnswerType": {k: round(v, ndigits) for k, v in self.per_answer_type.items()},
            "perQuestionType": {k: round(v, ndigits) for k, v in self.per_question_type.items()},
        }


def _load_json(source: JsonSource, what: str) -> tuple[Any, str]:
    """Parsed JSON and a name for error messages (the path, or ``<what>`` for in-memory data)."""
    if isinstance(source, dict | list):
        return source, f"<{what}>"
    path = Path(source)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f), str(path)
    except FileNotFoundError as err:
        raise EvaluationError(f"{what} file not found: {path}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvaluationError(f"{path}: malformed {what} JSON: {err}") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _records(data: Any, key: str, name: str) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise EvaluationError(f"{name}: expected a JSON object with a {key!r} list")
    return data[key]


def _question_ids(records: list[Any], key: str, name: str) -> list[int]:
    """Question ids of ``records`` in order; rejects bad and duplicate ids."""
    ids: list[int] = []
    seen: set[int] = set()
    for i, rec in enumerate(records):
        qid = rec.get("question_id") if isinstance(rec, dict) else None
        if not _is_int(qid):
            raise EvaluationError(f"{name}: {key}[{i}]: 'question_id' must be an integer")
        if qid in seen:
            raise EvaluationError(f"{name}: {key}[{i}]: duplicate question_id {qid}")
        seen.add(qid)
        ids.append(qid)
    return ids


def _human_answers(ann: dict[str, Any], i: int, name: str) -> list[str]:
    answers = ann.get("answers")
    where = f"{name}: annotations[{i}] (question_id {ann['question_id']})"
    if not isinstance(answers, list) or not answers:
        raise EvaluationError(f"{where}: 'answers' must be a non-empty list")
    if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise EvaluationError(f"{where}: every entry of 'answers' needs a string 'answer'")
    for field in ("question_type", "answer_type"):
        if not isinstance(ann.get(field), str):
            raise EvaluationError(f"{where}: {field!r} must be a string")
    return [a["answer"] for a in answers]


def _id_mismatch(expected: Sequence[int], got: Sequence[int], what: str, name: str) -> str | None:
    """Message saying how many ids are missing and extra, or None when the sets agree."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if not missing and not extra:
        return None
    return (
        f"{name}: {what} do not match the annotations: {len(missing)} question ids missing"
        f"{f' (e.g. {missing[:5]})' if missing else ''}, {len(extra)} extra"
        f"{f' (e.g. {extra[:5]})' if extra else ''}"
    )


def _percent(accs: list[float]) -> float:
    # Same operation order as the official setAccuracy, so rounding agrees to the last digit.
    return 100 * float(sum(accs)) / len(accs)


def evaluate_results(
    annotations: JsonSource, questions: JsonSource, results: JsonSource
) -> EvalReport:
    """Score ``[{"question_id", "answer"}]`` results against VQA v2 annotations.

    Like the official tool, every annotated question must have exactly one result, and types
    are reported in annotation order.
    """
    ann_data, ann_name = _load_json(annotations, "annotations")
    q_data, q_name = _load_json(questions, "questions")
    res_data, res_name = _load_json(results, "results")

    anns = _records(ann_data, "annotations", ann_name)
    if not anns:
        raise EvaluationError(f"{ann_name}: no annotations to evaluate")
    ann_ids = _question_ids(anns, "annotations", ann_name)
    q_ids = _question_ids(_records(q_data, "questions", q_name), "questions", q_name)
    if message := _id_mismatch(ann_ids, q_ids, "questions", q_name):
        raise EvaluationError(message)
    if not isinstance(res_data, list):
        raise EvaluationError(f"{res_name}: expected a JSON list of {{question_id, answer}}")
    res_ids = _question_ids(res_data, "results", res_name)
    if message := _id_mismatch(ann_ids, res_ids, "results", res_name):
        raise EvaluationError(message)
    predictions: dict[int, str] = {}
    for i, (qid, rec) in enumerate(zip(res_ids, res_data, strict=True)):
        if not isinstance(rec.get("answer"), str):
            raise EvaluationError(
                f"{res_name}: results[{i}] (question_id {qid}): 'answer' must be a string"
            )
        predictions[qid] = rec["answer"]

    accs: list[float] = []
    per_question: dict[int, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for i, (qid, ann) in enumerate(zip(ann_ids, anns, strict=True)):
        acc = vqa_accuracy(predictions[qid], _human_answers(ann, i, ann_name))
        accs.append(acc)
        per_question[qid] = 100 * acc
        by_answer_type.setdefault(ann["answer_type"], []).append(acc)
        by_question_type.setdefault(ann["question_type"], []).append(acc)

    return EvalReport(
        overall=_percent(accs),
        per_answer_type={k: _percent(v) for k, v in by_answer_type.items()},
        per_question_type={k: _percent(v) for k, v in by_question_type.items()},
        per_question=per_question,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m vqa.official_scorer",
        description="Score VQA results ([{question_id, answer}]) like the official evaluator.",
    )
    parser.add_argument("--annotations", required=True, type=Path, help="VQA v2 annotations JSON")
    parser.add_argument("--questions", required=True, type=Path, help="VQA v2 questions JSON")
    parser.add_argument("--results", required=True, type=Path, help="EvalAI-format results JSON")
    parser.add_argument(
        "--per-question",
        type=Path,
        metavar="FILE",
        help="also write unrounded per-question accuracies {question_id: percent} here",
    )
    args = parser.parse_args(argv)
    try:
        report = evaluate_results(args.annotations, args.questions, args.results)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.per_question is not None:
        args.per_question.write_text(
            json.dumps({str(k): v for k, v in report.per_question.items()})
        )
    print(json.dumps(report.official(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
