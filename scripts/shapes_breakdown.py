"""Accuracy per question family on a synthetic shapes set, for one or more results files.

VQA's answer types lump different skills together ("other" holds both "what color is the
triangle?" and the relational "what color is the shape left of the red circle?"). The shapes
generator knows which template wrote each question, so this splits the official per-question
scores (``vqa.official_scorer``) by family::

    python -m vqa.cli.eval ckpt_path=<run>/checkpoints/best.ckpt        # writes <eval run>/*results.json
    python scripts/shapes_breakdown.py parallel=<eval run> late=<other eval run> \\
        [--root data/shapes --split val2014 --out table.md]      # or --split test2015 (held out)
    python scripts/shapes_breakdown.py --priors --root data/shapes_pair --split test2015

Each argument is ``label=path`` (or just a path) where path is a results JSON or a folder
holding exactly one ``*_results.json``. Prints a markdown table, one row per results file.
``--priors`` adds the two blind floors a model must beat, fitted on train2014 and scored on
the same split: *question-only* answers each question text with its most common training answer,
*image-only* gives the most common training answer to every question (without the question, an
image does not say which family is asked, so no better guess is open to it).

The variants (``data=shapes_pair``, ``data=shapes_prior``) are scored with their own families;
which set a root holds is read from its manifest (``--data`` overrides). On shapes_prior the
question-only prior ignores the question's quadrant: a prior keyed by text and quadrant reads
the conditioning label, so it is not blind.

On the variants ``--priors`` also adds the *ceilings* of a model that misses what the variant
is about, fitted on train2014 from the scenes in ``Scenes/`` (a model clearly above one has
used what it misses):

- shapes_pair, *left image only* (and *right image only*): the question text and everything
  the left image shows of what the text asks about (the count of its colour or shape, the
  colour of its shape, whether it is the image compared first), the other image unseen; each
  such view gets its most common training answer. About the best the single-stream baseline
  (``data.streams=[left]``) can reach.
- shapes_prior, *no quadrant*: the question text and the whole image, the quadrant label
  unseen. The image settles the answer in every quadrant where the text is well posed; the
  family and that multiset of answers get their most common training answer. About the best a
  model that ignores the conditioning label can reach.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from vqa.data import shapes, shapes_pair, shapes_prior
from vqa.data.layout import split_layout
from vqa.data.shapes import COLORS, SHAPES, Family, Scene, iter_scenes, read_manifest, scenes_path
from vqa.official_scorer import evaluate_results

ANSWER_TYPES = ("yes/no", "number", "other")
# data config name -> its generator module (the families, in column order, and family_of)
SETS = {"shapes": shapes, "shapes_pair": shapes_pair, "shapes_prior": shapes_prior}
# A blind predictor: a question record (text, image_id, a variant's extra keys) -> its answer.
Guess = Callable[[dict[str, Any]], str]
AnsweredQuestion = tuple[dict[str, Any], str]  # a question record and its canonical answer


def detect_set(root: str | Path) -> str:
    """The synthetic set under ``root``, from its manifest's generator (default: shapes)."""
    generator = (read_manifest(root) or {}).get("generator")
    for name, module in SETS.items():
        if generator == module.GENERATOR:
            return name
    return "shapes"  # also sets written by `python -m vqa.data.shapes` before it named itself


def families(data: str) -> tuple[Family, ...]:
    return SETS[data].FAMILIES


def family_accuracy(
    root: str | Path, split: str, results: str | Path, data: str | None = None
) -> dict[str, float]:
    """Overall, per answer type and per family accuracy (percent) of one results file."""
    data = data or detect_set(root)
    family_of = SETS[data].family_of
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
        **{
            f.name: statistics.fmean(by_family[f.name]) for f in families(data) if by_family[f.name]
        },
    }


def fitted_guess(
    train: list[AnsweredQuestion], key: Callable[[dict[str, Any]], Hashable], unseen: Guess
) -> Guess:
    """The most common training answer of the question's key; ``unseen`` where no training
    question had that key."""
    answers: dict[Hashable, Counter[str]] = defaultdict(Counter)
    for question, answer in train:
        answers[key(question)][answer] += 1

    def guess(question: dict[str, Any]) -> str:
        seen = answers.get(key(question))
        return seen.most_common(1)[0][0] if seen else unseen(question)

    return guess


_COLOR, _SHAPE, _SIDE = "|".join(COLORS), "|".join(SHAPES), "|".join(shapes_pair.STREAMS)
# The pair questions whose answer one image bears on, with what they ask about (cf.
# shapes_pair.FAMILY_PATTERNS, which only names the family).
_MORE_COLOR = re.compile(
    rf"are there more (?P<color>{_COLOR}) shapes in the (?P<side>{_SIDE}) image than in the "
    rf"(?:{_SIDE}) one\?"
)
_COUNT_SHAPE = re.compile(rf"how many (?P<shape>{_SHAPE})s are there in the two images\?")
_COUNT_COLOR = re.compile(rf"how many (?P<color>{_COLOR}) shapes are there in the two images\?")
_COLOR_IN = re.compile(rf"what color is the (?P<shape>{_SHAPE}) in the (?P<side>{_SIDE}) image\?")


def single_image_view(question: str, side: str, scene: Scene) -> tuple[Hashable, ...]:
    """What ``scene``, the pair's ``side`` image, shows of what ``question`` asks about, keyed
    by the question's kind (not its colour or shape word, so that alike questions pool their
    training answers).

    same_color gets its family alone: one image's colour says nothing of a match with an
    unseen one, and the family is asked of pairs where either answer comes out.
    """
    if m := _MORE_COLOR.fullmatch(question):
        return ("more_color", m["side"] == side, sum(o.color == m["color"] for o in scene))
    if m := _COUNT_SHAPE.fullmatch(question):
        return ("count_shape", sum(o.shape == m["shape"] for o in scene))
    if m := _COUNT_COLOR.fullmatch(question):
        return ("count_color", sum(o.color == m["color"] for o in scene))
    if m := _COLOR_IN.fullmatch(question):
        if m["side"] != side:
            return ("color_in", "the other image")
        (only,) = [o for o in scene if o.shape == m["shape"]]  # unique by construction
        return ("color_in", only.color)
    return (shapes_pair.family_of(question),)


def single_image_guesses(
    root: str | Path, split: str, train: list[AnsweredQuestion], unseen: Guess
) -> dict[str, Guess]:
    """shapes_pair: per stream, the ceiling of a predictor that sees only that image."""
    # Left image id -> pair, both splits at once: the splits' image ids are disjoint.
    pairs = shapes_pair.iter_pairs(root, "train2014") | shapes_pair.iter_pairs(root, split)
    guesses = {}
    for index, side in enumerate(shapes_pair.STREAMS):

        def view(question: dict[str, Any], index: int = index, side: str = side) -> Hashable:
            scene = pairs[question["image_id"]][index]
            return single_image_view(question["question"], side, scene)

        guesses[f"{side} image only (ceiling)"] = fitted_guess(train, view, unseen)
    return guesses


def quadrant_answers(root: str | Path, splits: set[str]) -> dict[tuple[int, str], list[str]]:
    """(image_id, question text) -> its answers in the quadrants where it is well posed (in
    QUADRANTS order), for every text the shapes_prior families can ask of each image, written
    by the generator's own per-quadrant candidates."""
    answers: dict[tuple[int, str], list[str]] = defaultdict(list)
    for split in sorted(splits):
        image_size = json.loads(scenes_path(root, split).read_text(encoding="utf-8"))["image_size"]
        for image_id, scene in iter_scenes(root, split):
            quadrants = shapes_prior.split_quadrants(scene, image_size)
            for family in shapes_prior.FAMILIES:
                for (text, _quadrant), answer in family.candidates(quadrants):
                    answers[image_id, text].append(answer)
    return answers


def no_quadrant_guesses(
    root: str | Path, split: str, train: list[AnsweredQuestion]
) -> dict[str, Guess]:
    """shapes_prior: the ceiling of a predictor that sees the whole image but not the quadrant."""
    answers = quadrant_answers(root, {"train2014", split})

    def view(question: dict[str, Any]) -> Hashable:
        text = question["question"]
        return shapes_prior.family_of(text), tuple(sorted(answers[question["image_id"], text]))

    def most_common_quadrant_answer(question: dict[str, Any]) -> str:
        # a view no training question had: every quadrant alike likely to be the one asked
        return Counter(answers[question["image_id"], question["question"]]).most_common(1)[0][0]

    return {"no quadrant (ceiling)": fitted_guess(train, view, most_common_quadrant_answer)}


def prior_guesses(root: str | Path, split: str, data: str = "shapes") -> dict[str, Guess]:
    """The blind floors, and on the variants the ceilings, fitted on train2014: label -> guess."""
    train_layout = split_layout(root, "train2014")
    train_annotations = json.loads(train_layout.annotations.read_text(encoding="utf-8"))
    questions = json.loads(train_layout.questions.read_text(encoding="utf-8"))["questions"]
    by_id = {q["question_id"]: q for q in questions}
    train = [
        (by_id[a["question_id"]], a["multiple_choice_answer"])
        for a in train_annotations["annotations"]
    ]
    constant = Counter(answer for _, answer in train).most_common(1)[0][0]
    question_only = fitted_guess(train, lambda q: q["question"], lambda q: constant)
    guesses = {"question-only prior": question_only, "image-only prior": lambda q: constant}
    if data == "shapes_pair":
        guesses |= single_image_guesses(root, split, train, question_only)
    elif data == "shapes_prior":
        guesses |= no_quadrant_guesses(root, split, train)
    return guesses


def prior_results(
    root: str | Path, split: str, out_dir: Path, data: str | None = None
) -> dict[str, Path]:
    """Results files (the official format) of :func:`prior_guesses` on ``split``."""
    asked = json.loads(split_layout(root, split).questions.read_text(encoding="utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for label, guess in prior_guesses(root, split, data or detect_set(root)).items():
        path = out_dir / f"{re.sub(r'[^a-z]+', '_', label).strip('_')}_results.json"
        results = [
            {"question_id": q["question_id"], "answer": guess(q)} for q in asked["questions"]
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


def markdown_table(rows: dict[str, dict[str, float]], data: str = "shapes") -> str:
    columns = ["overall", *ANSWER_TYPES, *(f.name for f in families(data))]
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
    parser.add_argument(
        "--priors", action="store_true", help="add the blind floors' (and ceilings') rows"
    )
    parser.add_argument(
        "--data", choices=sorted(SETS), help="the set under --root (default: from its manifest)"
    )
    args = parser.parse_args(argv)
    if not args.runs and not args.priors:
        parser.error("give at least one results file, or --priors")
    data = args.data or detect_set(args.root)
    rows = {}
    if args.priors:
        with tempfile.TemporaryDirectory() as tmp:
            for label, path in prior_results(args.root, args.split, Path(tmp), data).items():
                rows[label] = family_accuracy(args.root, args.split, path, data)
    for run in args.runs:
        label, _, path = run.rpartition("=")
        results = resolve_results(Path(path))
        rows[label or str(path)] = family_accuracy(args.root, args.split, results, data)
    table = markdown_table(rows, data)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n", encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
