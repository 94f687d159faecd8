"""Accuracy per question family on the synthetic shapes set, for one or more results files.

VQA's answer types lump different skills together ("other" holds both "what color is the
triangle?" and the relational "what color is the shape left of the red circle?"). The shapes
generator knows which template wrote each question, so this splits the official per-question
scores (``vqa.official_scorer``) by family::

    python -m vqa.cli.eval ckpt_path=<run>/checkpoints/best.ckpt        # writes <eval run>/*results.json
    python scripts/shapes_breakdown.py parallel=<eval run> late=<other eval run> \\
        [--root data/shapes --split val2014 --out table.md]      # or --split test2015 (held out)

Each argument is ``label=path`` (or just a path) where path is a results JSON or a folder
holding exactly one ``*_results.json``. Prints a markdown table, one row per results file.
``--priors`` adds the two blind floors a model must beat, fitted on train2014 and scored on
the same split: *question-only* answers each question text with its most common training answer,
*image-only* gives the most common training answer to every question (without the question, an
image does not say which of the seven families is asked, so no better guess is open to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from vqa.data.layout import split_layout
from vqa.data.shapes import FAMILIES, family_of
from vqa.official_scorer import evaluate_results

ANSWER_TYPES = ("yes/no", "number", "other")


def family_accuracy(root: str | Path, split: str, results: str | Path) -> dict[str, float]:
    """Overall, per answer type and per family accuracy (percent) of one results file."""
    layout = split_layout(root, split)
    if layout.annotations is None:
        raise ValueError(f"{split} has no annotations to score")
    report = evaluate_results(layout.annotations, layout.questions, results)
    questions = json.loads(layout.questions.read_text(encoding="utf-8"))["questions"]
    by_family: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        by_family[family_of(q["question"])].append(report.per_question[q["question_id"]])
    return {
        "overall": report.overall,
        **{t: report.per_answer_type[t] for t in ANSWER_TYPES if t in report.per_answer_type},
        **{f.name: statistics.fmean(by_family[f.name]) for f in FAMILIES if by_family[f.name]},
    }


def prior_results(root: str | Path, split: str, out_dir: Path) -> dict[str, Path]:
    """Results files (the official format) of the question-only and image-only priors."""
    train = json.loads(split_layout(root, "train2014").annotations.read_text(encoding="utf-8"))
    train_questions = json.loads(split_layout(root, "train2014").questions.read_text("utf-8"))
    text = {q["question_id"]: q["question"] for q in train_questions["questions"]}
    by_question: dict[str, Counter[str]] = defaultdict(Counter)
    overall: Counter[str] = Counter()
    for a in train["annotations"]:
        by_question[text[a["question_id"]]][a["multiple_choice_answer"]] += 1
        overall[a["multiple_choice_answer"]] += 1
    constant = overall.most_common(1)[0][0]
    asked = json.loads(split_layout(root, split).questions.read_text(encoding="utf-8"))
    guesses = {
        "question-only prior": lambda q: (by_question.get(q) or overall).most_common(1)[0][0],
        "image-only prior": lambda q: constant,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for label, guess in guesses.items():
        path = out_dir / f"{label.split()[0]}_results.json"
        results = [
            {"question_id": q["question_id"], "answer": guess(q["question"])}
            for q in asked["questions"]
        ]
        path.write_text(json.dumps(results), encoding="utf-8")
        paths[label] = path
    return paths


def resolve_results(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.rglob("*_results.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected exactly one *_results.json, found {len(found)}")
    return found[0]


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    columns = ["overall", *ANSWER_TYPES, *(f.name for f in FAMILIES)]
    lines = [
        "| run | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, row in rows.items():
        cells = [f"{row[c]:.1f}" if c in row else "" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="label=path or path (results JSON or folder)")
    parser.add_argument("--root", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="val2014")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--priors", action="store_true", help="add the blind floors' rows")
    args = parser.parse_args(argv)
    if not args.runs and not args.priors:
        parser.error("give at least one results file, or --priors")
    rows = {}
    if args.priors:
        with tempfile.TemporaryDirectory() as tmp:
            for label, path in prior_results(args.root, args.split, Path(tmp)).items():
                rows[label] = family_accuracy(args.root, args.split, path)
    for run in args.runs:
        label, _, path = run.rpartition("=")
        results = resolve_results(Path(path))
        rows[label or str(path)] = family_accuracy(args.root, args.split, results)
    table = markdown_table(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
