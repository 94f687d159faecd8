"""Synthetic pairs: every question reads two images (streams ``left`` and ``right``).

A variant of the default shapes set (:mod:`vqa.data.shapes`), generated the same way (same
scenes, rendering, balanced question sampling, simulated annotators, manifest) and written in
the VQA v2 layout, so that models with several visual streams can be trained and checked on
questions no single image answers::

    python -m vqa.data.shapes_pair --out data/shapes_pair --seed 0

Each item is two freshly sampled scenes, stored as two images of the split under their own
ids (item p: ``2p`` left, ``2p + 1`` right). A question record keeps ``image_id`` (the left
image, so VQA tools still work) and adds ``"image_ids": {"left": ..., "right": ...}``; the
annotation's ``image_id`` is the left one too. Four families, answers balanced as in the
default set; referents ("the circle in the left image") are unique in their image:

- ``more_color``: "are there more red shapes in the left image than in the right one?"
- ``same_color``: "is the circle in the left image the same color as the square in the right
  one?" (asked only of pairs where one such comparison comes out yes and another no, about one
  pair in eight, so that its answers balance: the smallest family, ~4 % of the questions)
- ``count_both``: "how many triangles are there in the two images?"
- ``color_in``: "what color is the circle in the right image?" (or the left one)

The left image alone settles only ``color_in`` about it and "more ... in the left image" where
it has none of that colour; one image's count still says much about ``more_color``, little about
``count_both``, nothing about ``same_color`` or ``color_in`` about the other image (the single-
stream baseline, ``data.streams=[left]``). ``Scenes/`` holds every image's objects and the
pairs, so answers can be re-derived.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from vqa.data.layout import split_layout
from vqa.data.shapes import (
    COLORS,
    MAX_OBJECTS,
    SHAPES,
    Family,
    QuestionSampler,
    Scene,
    SceneObject,
    SetGenerator,
    ShapesConfig,
    annotation_record,
    run_cli,
    sample_scene,
    save_image,
    scenes_path,
    write_split_files,
)

# Bump on any change to what is written, so cached sets regenerate.
GENERATOR_VERSION = 1
# Recorded in the manifest; not __name__, which is "__main__" under `python -m`.
GENERATOR = "vqa.data.shapes_pair"
STREAMS = ("left", "right")
Pair = tuple[Scene, Scene]
# At most this many questions of a family per pair while others can be asked: same_color, which
# few pairs allow, would otherwise take all six questions of those pairs.
QUESTIONS_PER_FAMILY = 2


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def _sides(pair: Pair) -> dict[str, Scene]:
    return dict(zip(STREAMS, pair, strict=True))


def _unique_shapes(scene: Scene) -> dict[str, SceneObject]:
    """Shape -> the one object of that shape, for shapes that occur exactly once in ``scene``."""
    return {
        shape: matches[0]
        for shape in SHAPES
        if len(matches := [o for o in scene if o.shape == shape]) == 1
    }


def _more_color(pair: Pair) -> list[tuple[str, str]]:
    counts = {side: Counter(o.color for o in scene) for side, scene in _sides(pair).items()}
    return [
        (
            f"are there more {c} shapes in the {side} image than in the {_other(side)} one?",
            _yes_no(counts[side][c] > counts[_other(side)][c]),
        )
        for c in COLORS
        for side in STREAMS
    ]


def _same_color(pair: Pair) -> list[tuple[str, str]]:
    """Asked only of pairs where it can come out either way: two unique shapes share one of six
    colours far less often than not, and "no" everywhere would let a blind model score."""
    unique = {side: _unique_shapes(scene) for side, scene in _sides(pair).items()}
    candidates = [
        (
            f"is the {a} in the {side} image the same color as the {b} in the {_other(side)} one?",
            _yes_no(first.color == second.color),
        )
        for side in STREAMS
        for a, first in unique[side].items()
        for b, second in unique[_other(side)].items()
    ]
    return candidates if {a for _, a in candidates} == {"yes", "no"} else []


def _count_both(pair: Pair) -> list[tuple[str, str]]:
    objects = [o for scene in pair for o in scene]
    shapes, colors = Counter(o.shape for o in objects), Counter(o.color for o in objects)
    return [(f"how many {s}s are there in the two images?", str(shapes[s])) for s in SHAPES] + [
        (f"how many {c} shapes are there in the two images?", str(colors[c])) for c in COLORS
    ]


def _color_in(pair: Pair) -> list[tuple[str, str]]:
    return [
        (f"what color is the {shape} in the {side} image?", obj.color)
        for side, scene in _sides(pair).items()
        for shape, obj in _unique_shapes(scene).items()
    ]


_COUNTS = tuple(str(n) for n in range(2 * MAX_OBJECTS + 1))  # over the two images
FAMILIES: tuple[Family, ...] = (
    Family("more_color", "are there more", "yes/no", _more_color, ("yes", "no")),
    Family("same_color", "is the", "yes/no", _same_color, ("yes", "no")),
    Family("count_both", "how many", "number", _count_both, _COUNTS),
    Family("color_in", "what color is the", "other", _color_in, tuple(COLORS)),
)

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_SIDE = "left|right"
# One pattern per family, matching exactly the questions its ``candidates`` writes.
FAMILY_PATTERNS: dict[str, re.Pattern[str]] = {
    "more_color": re.compile(
        rf"are there more (?:{_COLOR}) shapes in the (?:{_SIDE}) image than in the "
        rf"(?:{_SIDE}) one\?"
    ),
    "same_color": re.compile(
        rf"is the (?:{_SHAPE}) in the (?:{_SIDE}) image the same color as the (?:{_SHAPE}) in "
        rf"the (?:{_SIDE}) one\?"
    ),
    "count_both": re.compile(
        rf"how many (?:(?:{_SHAPE})s|(?:{_COLOR}) shapes) are there in the two images\?"
    ),
    "color_in": re.compile(rf"what color is the (?:{_SHAPE}) in the (?:{_SIDE}) image\?"),
}


def family_of(question: str) -> str:
    """The family that wrote ``question``; raises ValueError for text no family writes."""
    for name, pattern in FAMILY_PATTERNS.items():
        if pattern.fullmatch(question):
            return name
    raise ValueError(f"{question!r} is not a synthetic shapes_pair question")


def image_ids(item: int) -> dict[str, int]:
    """The stream -> image id of item ``item`` (numbered from 1 across the splits)."""
    return {"left": 2 * item, "right": 2 * item + 1}


# --------------------------------------------------------------------------- writing the set

_INFO = {
    "description": "coattn-vqa synthetic shapes pairs (two images per question), VQA v2 format",
    "version": str(GENERATOR_VERSION),
    "contributor": GENERATOR,
}


def _generate_split(
    root: Path, split: str, num_pairs: int, first_pair: int, config: ShapesConfig
) -> dict[str, int]:
    """Write one split's image pairs, questions, annotations and scene metadata."""
    rng = random.Random(f"shapes_pair-v{GENERATOR_VERSION}-seed{config.seed}-{split}")
    sampler = QuestionSampler(rng, FAMILIES, spread=QUESTIONS_PER_FAMILY)
    layout = split_layout(root, split)
    layout.image_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations, scenes, pairs = [], [], [], []
    for item in range(first_pair, first_pair + num_pairs):
        ids = image_ids(item)
        pair = (sample_scene(rng, config.image_size), sample_scene(rng, config.image_size))
        for stream, scene in zip(STREAMS, pair, strict=True):
            save_image(scene, config.image_size, layout.image_path(ids[stream]))
            scenes.append({"image_id": ids[stream], "objects": [asdict(o) for o in scene]})
        pairs.append(ids)
        for k, q in enumerate(sampler.sample(pair, config.questions_per_image)):
            question_id = ids["left"] * 1000 + k  # the VQA v2 convention, on the first image
            questions.append(
                {
                    "image_id": ids["left"],
                    "question": q.question,
                    "question_id": question_id,
                    "image_ids": ids,
                }
            )
            annotations.append(annotation_record(rng, q, ids["left"], question_id))
    write_split_files(
        root,
        split,
        _INFO,
        questions,
        annotations,
        {
            "data_subtype": split,
            "image_size": config.image_size,
            "scenes": scenes,
            "pairs": pairs,
        },
    )
    return {"pairs": num_pairs, "images": 2 * num_pairs, "questions": len(questions)}


SHAPES_PAIR_SET = SetGenerator(GENERATOR, GENERATOR_VERSION, _generate_split)


def iter_pairs(root: str | Path, split: str) -> dict[int, Pair]:
    """Left image id (the questions' ``image_id``) -> (left scene, right scene) of a split."""
    payload = json.loads(scenes_path(root, split).read_text(encoding="utf-8"))
    scenes = {
        item["image_id"]: [SceneObject(**o) for o in item["objects"]] for item in payload["scenes"]
    }
    return {ids["left"]: (scenes[ids["left"]], scenes[ids["right"]]) for ids in payload["pairs"]}


def main(argv: list[str] | None = None) -> None:
    run_cli(argv, SHAPES_PAIR_SET, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
