"""Does a trained model know which referent a relation question named first?

"Is the red circle left of the blue square?" and "is the blue square left of the red circle?"
have opposite answers (no two centres share an x). This asks a checkpoint both orders of every
pair of uniquely described objects in every scene of a shapes split (one relation word per
pair, drawn from a fixed seed, so half the answers are "yes") and reports::

    python scripts/relation_swap.py CKPT [--root data/shapes --split test2015 --batch-size 256]

* accuracy over all those questions, and by slice (the referents share a colour / a shape /
  neither, their centres closer than 20 px in x or not, objects in the scene);
* how often swapping A and B leaves the model's answer unchanged: 0 % for a model that binds
  each referent to its place in the question, about 50 % for one that reads the question as
  a bag of words.

The README's relation diagnostics (co-attention at the quick-start's budget) come from it.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from vqa.data.layout import split_layout
from vqa.data.shapes import Scene, SceneObject, _unique, iter_scenes

CLOSE_PX = 20.0


@dataclass(frozen=True)
class SwappedPair:
    """One referent pair asked in both orders: ``questions[i]`` has answer ``answers[i]``."""

    image_id: int
    questions: tuple[str, str]
    answers: tuple[str, str]
    slices: tuple[str, ...]


def _describe(obj: SceneObject) -> str:
    return f"{obj.color} {obj.shape}"


def swapped_pairs(image_id: int, scene: Scene, rng: random.Random) -> list[SwappedPair]:
    """Every pair of uniquely described objects of ``scene``, asked A-B and B-A with one
    relation word drawn from ``rng``."""
    pairs = []
    for a, b in combinations(_unique(scene), 2):
        relation = rng.choice(("left of", "right of"))
        questions, answers = [], []
        for first, second in ((a, b), (b, a)):
            truth = first.x < second.x if relation == "left of" else first.x > second.x
            questions.append(f"is the {_describe(first)} {relation} the {_describe(second)}?")
            answers.append("yes" if truth else "no")
        shared = (
            "same colour"
            if a.color == b.color
            else "same shape"
            if a.shape == b.shape
            else "differ"
        )
        close = f"dx < {CLOSE_PX:g} px" if abs(a.x - b.x) < CLOSE_PX else f"dx >= {CLOSE_PX:g} px"
        slices = (f"referents: {shared}", close, f"{len(scene)} objects")
        pairs.append(SwappedPair(image_id, tuple(questions), tuple(answers), slices))
    return pairs


@dataclass(frozen=True)
class SwapReport:
    questions: int
    accuracy: float
    unchanged: float  # share of pairs whose two answers are the same
    by_slice: dict[str, tuple[int, float]]  # slice -> (questions, accuracy)


def score(pairs: Sequence[SwappedPair], predicted: Sequence[tuple[str, str]]) -> SwapReport:
    """The report for ``predicted[i]``, the model's answers to ``pairs[i].questions``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    unchanged = 0
    for pair, answers in zip(pairs, predicted, strict=True):
        unchanged += answers[0] == answers[1]
        for got, want in zip(answers, pair.answers, strict=True):
            hits["all"].append(got == want)
            for name in pair.slices:
                hits[name].append(got == want)
    rate = {name: (len(v), sum(v) / len(v)) for name, v in hits.items()}
    return SwapReport(
        questions=rate["all"][0],
        accuracy=rate["all"][1],
        unchanged=unchanged / len(pairs),
        by_slice={name: rate[name] for name in sorted(rate) if name != "all"},
    )


def split_pairs(root: Path, split: str, seed: int = 0) -> list[SwappedPair]:
    rng = random.Random(seed)
    return [
        p
        for image_id, scene in iter_scenes(root, split)
        for p in swapped_pairs(image_id, scene, rng)
    ]


def predict(ckpt: Path, root: Path, split: str, pairs: Iterable[SwappedPair], batch_size: int):
    from vqa.inference import Predictor  # the model stack, only when a checkpoint is scored

    predictor = Predictor.from_checkpoint(ckpt, cache_size=1024)
    layout = split_layout(root, split)
    flat = [(layout.image_path(p.image_id), q) for p in pairs for q in p.questions]
    answers = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        predictions = predictor.predict_batch([i for i, _ in chunk], [q for _, q in chunk], 1)
        answers += [prediction.answer for prediction in predictions]
    return list(zip(answers[0::2], answers[1::2], strict=True))


def render(report: SwapReport) -> str:
    lines = [
        f"questions: {report.questions} (both orders of {report.questions // 2} referent pairs)",
        f"accuracy: {100 * report.accuracy:.1f} %",
        f"answer unchanged when A and B swap: {100 * report.unchanged:.1f} % of pairs",
        "",
        "| slice | questions | accuracy |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {n} | {100 * a:.1f} % |" for k, (n, a) in report.by_slice.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--root", type=Path, default=Path("data/shapes"))
    parser.add_argument("--split", default="test2015")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    pairs = split_pairs(args.root, args.split)
    text = render(score(pairs, predict(args.ckpt, args.root, args.split, pairs, args.batch_size)))
    print(text)
    return text


if __name__ == "__main__":
    main()
