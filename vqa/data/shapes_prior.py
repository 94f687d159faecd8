"""Synthetic quadrant questions: each question is about one named quarter of its image.

A variant of the default shapes set (:mod:`vqa.data.shapes`), generated the same way (scenes,
rendering, balanced question sampling, simulated annotators, manifest) and written in the VQA v2
layout, to train and check conditioning on a categorical label that is not in the text::

    python -m vqa.data.shapes_prior --out data/shapes_prior --seed 0

Each image holds 5-8 shapes, each kept wholly inside one quadrant (its bounding disc clear of
both midlines), so which quadrant an object is in is never a close call. Every question record
carries ``"quadrant": "top left" | "top right" | "bottom left" | "bottom right"`` beside its
text, and the answer is computed over that quadrant's objects only. Four families, answers
balanced as in the default set; "the circle" is unique in its quadrant:

- ``count_in``: "how many shapes are there?", "how many circles are there?"
- ``exists_in``: "is there a red shape?", "is there a circle?"
- ``color_in``: "what color is the circle?"
- ``shape_in``: "what shape is the red object?"

A text is only asked in a quadrant when another quadrant where it is well posed answers it
differently, so the same text has different answers in different quadrants of the same image
and the image and text alone never settle it. ``Scenes/`` holds the objects (the quadrant of
each is :func:`quadrant_of` its centre), so every answer can be re-derived.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from vqa.data.layout import split_layout
from vqa.data.shapes import (
    COLORS,
    SHAPES,
    Family,
    Placement,
    QuestionSampler,
    Scene,
    SceneObject,
    SetGenerator,
    ShapesConfig,
    annotation_record,
    color_of_shape,
    run_cli,
    sample_scene,
    save_image,
    shape_of_color,
    write_split_files,
)

# Bump on any change to what is written, so cached sets regenerate.
GENERATOR_VERSION = 1
# Recorded in the manifest; not __name__, which is "__main__" under `python -m`.
GENERATOR = "vqa.data.shapes_prior"
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
FIELD = "quadrant"  # the question record's conditioning key
# Enough objects that the quadrants differ (mostly 1-3 each); more seldom fit, each wholly
# inside a quadrant, and every failed placement redraws the scene.
MIN_OBJECTS, MAX_OBJECTS = 5, 8
# At most this many questions of a family per image while others can be asked.
QUESTIONS_PER_FAMILY = 2
Quadrants = dict[str, Scene]  # quadrant -> the objects in it, every quadrant present


def quadrant_of(obj: SceneObject, image_size: int) -> str:
    """The quadrant holding ``obj``'s centre (image y grows downwards: top is small y)."""
    half = image_size / 2
    return f"{'top' if obj.y < half else 'bottom'} {'left' if obj.x < half else 'right'}"


def split_quadrants(scene: Scene, image_size: int) -> Quadrants:
    quadrants: Quadrants = {q: [] for q in QUADRANTS}
    for obj in scene:
        quadrants[quadrant_of(obj, image_size)].append(obj)
    return quadrants


def inside_one_quadrant(image_size: int) -> Placement:
    """The placement rule: an object's bounding disc stays clear of both midlines."""
    half = image_size / 2

    def fits(x: float, y: float, extent: float) -> bool:
        return min(abs(x - half), abs(y - half)) >= extent

    return fits


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


# Per-quadrant question writers: (text, answer) over one quadrant's objects, as in shapes.py.


def _count_in(objects: Scene) -> list[tuple[str, str]]:
    counts = Counter(o.shape for o in objects)
    return [("how many shapes are there?", str(len(objects)))] + [
        (f"how many {s}s are there?", str(counts[s])) for s in SHAPES
    ]


def _exists_in(objects: Scene) -> list[tuple[str, str]]:
    colors, shapes = {o.color for o in objects}, {o.shape for o in objects}
    return [(f"is there a {c} shape?", _yes_no(c in colors)) for c in COLORS] + [
        (f"is there a {s}?", _yes_no(s in shapes)) for s in SHAPES
    ]


QuadrantCandidates = Callable[[Quadrants], list[tuple[tuple[str, str], str]]]


def _varying(ask: Callable[[Scene], list[tuple[str, str]]]) -> QuadrantCandidates:
    """A family's candidates, keyed (text, quadrant): each text in the quadrants where it is
    well posed, kept only where those quadrants do not all give the same answer."""

    def candidates(quadrants: Quadrants) -> list[tuple[tuple[str, str], str]]:
        by_text: dict[str, dict[str, str]] = defaultdict(dict)
        for quadrant, objects in quadrants.items():
            for text, answer in ask(objects):
                by_text[text][quadrant] = answer
        return [
            ((text, quadrant), answer)
            for text, answers in by_text.items()
            if len(set(answers.values())) > 1
            for quadrant, answer in answers.items()
        ]

    return candidates


_COUNTS = tuple(str(n) for n in range(MAX_OBJECTS + 1))
FAMILIES: tuple[Family, ...] = (
    Family("count_in", "how many", "number", _varying(_count_in), _COUNTS),
    Family("exists_in", "is there a", "yes/no", _varying(_exists_in), ("yes", "no")),
    Family("color_in", "what color is the", "other", _varying(color_of_shape), tuple(COLORS)),
    Family("shape_in", "what shape is the", "other", _varying(shape_of_color), SHAPES),
)

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
# One pattern per family, matching exactly the texts its writer asks.
FAMILY_PATTERNS: dict[str, re.Pattern[str]] = {
    "count_in": re.compile(rf"how many (?:shape|{_SHAPE})s are there\?"),
    "exists_in": re.compile(rf"is there a (?:(?:{_COLOR}) shape|{_SHAPE})\?"),
    "color_in": re.compile(rf"what color is the (?:{_SHAPE})\?"),
    "shape_in": re.compile(rf"what shape is the (?:{_COLOR}) object\?"),
}


def family_of(question: str) -> str:
    """The family that wrote ``question``; raises ValueError for text no family writes."""
    for name, pattern in FAMILY_PATTERNS.items():
        if pattern.fullmatch(question):
            return name
    raise ValueError(f"{question!r} is not a synthetic shapes_prior question")


# --------------------------------------------------------------------------- writing the set

_INFO = {
    "description": "coattn-vqa synthetic shapes, questions about one quadrant, VQA v2 format",
    "version": str(GENERATOR_VERSION),
    "contributor": GENERATOR,
}


def _generate_split(
    root: Path, split: str, num_images: int, first_image_id: int, config: ShapesConfig
) -> dict[str, int]:
    """Write one split's images, questions (with their quadrant), annotations and scenes."""
    rng = random.Random(f"shapes_prior-v{GENERATOR_VERSION}-seed{config.seed}-{split}")
    sampler = QuestionSampler(rng, FAMILIES, spread=QUESTIONS_PER_FAMILY)
    fits = inside_one_quadrant(config.image_size)
    layout = split_layout(root, split)
    layout.image_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations, scenes = [], [], []
    for image_id in range(first_image_id, first_image_id + num_images):
        scene = sample_scene(rng, config.image_size, MIN_OBJECTS, MAX_OBJECTS, fits)
        save_image(scene, config.image_size, layout.image_path(image_id))
        scenes.append({"image_id": image_id, "objects": [asdict(o) for o in scene]})
        quadrants = split_quadrants(scene, config.image_size)
        for k, q in enumerate(sampler.sample(quadrants, config.questions_per_image)):
            text, quadrant = q.question
            question_id = image_id * 1000 + k  # the VQA v2 convention
            questions.append(
                {
                    "image_id": image_id,
                    "question": text,
                    "question_id": question_id,
                    FIELD: quadrant,
                }
            )
            annotations.append(annotation_record(rng, q, image_id, question_id))
    write_split_files(
        root,
        split,
        _INFO,
        questions,
        annotations,
        {"data_subtype": split, "image_size": config.image_size, "scenes": scenes},
    )
    return {"images": num_images, "questions": len(questions)}


SHAPES_PRIOR_SET = SetGenerator(GENERATOR, GENERATOR_VERSION, _generate_split)


def main(argv: list[str] | None = None) -> None:
    run_cli(argv, SHAPES_PRIOR_SET, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
