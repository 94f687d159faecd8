"""The embedded synthetic VQA set: coloured shapes, written in the exact VQA v2 files and layout.

It is the project's default data: generated on first use in seconds, deterministic from its
seed (same seed -> byte-identical JSON and JPEGs), and read by the very loader used for VQA v2,
so every stage from JSON parsing to the official accuracy is exercised without a download::

    python -m vqa.data.shapes --out data/shapes --seed 0

Each image holds 3-6 non-overlapping shapes. Questions come from seven families covering the
three VQA answer types; within each family the least-used answer that the scene allows is
asked next, so answers are balanced and a question-only model stays weak. Every question has
exactly one correct answer by construction (referents are unique, "left of" compares centre x
and is only asked where one object qualifies). Ten simulated annotators mostly give the
canonical answer, some a variant that normalises to it ("Yes", "two", "Red!"), a few a wrong
but plausible one, so normalisation and soft scores are exercised for real. The scene layouts
are written beside the data (``Scenes/``) so every answer can be re-derived, and each
annotation names the family that wrote its question (``question_family``, an extra field the
VQA v2 loader reads when present), so training logs accuracy per family.

Unlike VQA v2, test2015 is annotated too: val2014 selects the checkpoint and test2015 is held
out, scored once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from itertools import permutations
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vqa.data.layout import annotations_path, split_layout

log = logging.getLogger(__name__)

# 2: test2015 annotated, annotations name their question family. Bump on any change to what
# is written, so cached sets regenerate.
GENERATOR_VERSION = 2
# Seeds the per-split random streams; kept at 1 so that train2014/val2014 stay those of version 1.
STREAM_VERSION = 1
# The manifest's "generator" (not __name__: that is "__main__" under `python -m`, which made
# manifests written by the CLI differ from those written by the datamodule).
GENERATOR = "vqa.data.shapes"
MANIFEST_NAME = "shapes_manifest.json"
SPLITS = ("train2014", "val2014", "test2015")

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 190),
    "cyan": (40, 205, 215),
}
# Radius as a fraction of the image side: at 128 px a small circle is ~18 px wide, still
# ~13 px after resizing to 96 px input.
SIZES: dict[str, float] = {"small": 0.07, "large": 0.11}
# Bounding radius / radius per shape, so that squares' corners and triangles' tips never touch.
EXTENT: dict[str, float] = {"circle": 1.0, "square": 0.85 * math.sqrt(2), "triangle": 1.3}
BACKGROUND = (200, 200, 200)
MIN_OBJECTS, MAX_OBJECTS = 3, 6
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges like a real photo, not aliased steps
# Up to the largest count any synthetic set asks (shapes_pair counts over two images).
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six",
    "seven", "eight", "nine", "ten", "eleven", "twelve",
)  # fmt: skip


@dataclass(frozen=True)
class ShapesConfig:
    """Generator parameters; defaults make a quick start on a 2-core CPU."""

    num_train_images: int = 2000
    num_val_images: int = 500
    num_test_images: int = 500
    questions_per_image: int = 6
    image_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.num_train_images, self.num_val_images, self.num_test_images) < 0:
            raise ValueError(f"image counts must be >= 0, got {self}")
        if self.questions_per_image < 1:
            raise ValueError(f"questions_per_image must be >= 1, got {self.questions_per_image}")
        if self.image_size < 32:
            raise ValueError(
                f"image_size must be >= 32 px for shapes to fit, got {self.image_size}"
            )

    def split_sizes(self) -> dict[str, int]:
        return dict(
            zip(
                SPLITS,
                (self.num_train_images, self.num_val_images, self.num_test_images),
                strict=True,
            )
        )


@dataclass(frozen=True)
class SceneObject:
    """One shape; (x, y) is its centre and r its size radius, in pixels of the final image."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    r: float

    @property
    def extent(self) -> float:
        return self.r * EXTENT[self.shape]


Scene = list[SceneObject]


# --------------------------------------------------------------------------- scenes and images


# Where an object may go beyond the rules every scene keeps: (x, y, extent) -> allowed.
Placement = Callable[[float, float, float], bool]


def _try_place(
    rng: random.Random, placed: Scene, image_size: int, fits: Placement | None = None
) -> SceneObject | None:
    """A random object that keeps clear of the border and of every placed object, or None.

    ``fits`` adds a set's own rule (shapes_prior keeps objects inside one quadrant); it is
    checked on the same draws, so without it the random stream is that of every version.
    """
    shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
    r = SIZES[size] * image_size
    extent = r * EXTENT[shape]
    gap = 0.03 * image_size
    # Centres at least this far apart in x, so "left of" is visible, not a one-pixel call.
    min_dx = 0.04 * image_size
    low, high = extent + gap, image_size - extent - gap
    for _ in range(50):
        x, y = round(rng.uniform(low, high), 2), round(rng.uniform(low, high), 2)
        if (fits is None or fits(x, y, extent)) and all(
            math.hypot(x - o.x, y - o.y) >= extent + o.extent + gap and abs(x - o.x) >= min_dx
            for o in placed
        ):
            return SceneObject(shape, color, size, x, y, round(r, 2))
    return None


def sample_scene(
    rng: random.Random,
    image_size: int,
    min_objects: int = MIN_OBJECTS,
    max_objects: int = MAX_OBJECTS,
    fits: Placement | None = None,
) -> Scene:
    """3-6 (or min-max) non-overlapping objects with independent uniform shape, colour, size."""
    count = rng.randint(min_objects, max_objects)
    while True:  # a crowded draw that cannot fit the last object is redrawn from scratch
        scene: Scene = []
        while len(scene) < count and (obj := _try_place(rng, scene, image_size, fits)) is not None:
            scene.append(obj)
        if len(scene) == count:
            return scene


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene on a plain background (RGB, ``image_size`` square)."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * k, image_size * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in scene:
        x, y, r, fill = o.x * k, o.y * k, o.r * k, COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            h = r * EXTENT["square"] / math.sqrt(2)
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:  # upright equilateral triangle centred on (x, y)
            R = r * EXTENT["triangle"]
            angles = (-90.0, 30.0, 150.0)
            points = [
                (x + R * math.cos(math.radians(a)), y + R * math.sin(math.radians(a)))
                for a in angles
            ]
            draw.polygon(points, fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- question families


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _unique(scene: Scene) -> Scene:
    """Objects that "the <colour> <shape>" refers to unambiguously."""
    counts = Counter((o.color, o.shape) for o in scene)
    return [o for o in scene if counts[o.color, o.shape] == 1]


def _exists(scene: Scene) -> list[tuple[str, str]]:
    present = {(o.color, o.shape) for o in scene}
    return [(f"is there a {c} {s}?", _yes_no((c, s) in present)) for c in COLORS for s in SHAPES]


def _relation(scene: Scene) -> list[tuple[str, str]]:
    return [
        (f"is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?", _yes_no(truth))
        for a, b in permutations(_unique(scene), 2)
        for rel, truth in (("left of", a.x < b.x), ("right of", a.x > b.x))
    ]


def _count_color(scene: Scene) -> list[tuple[str, str]]:
    counts = Counter(o.color for o in scene)
    return [(f"how many {c} shapes are there?", str(counts[c])) for c in COLORS]


def _count_shape(scene: Scene) -> list[tuple[str, str]]:
    counts = Counter(o.shape for o in scene)
    return [(f"how many {s}s are there?", str(counts[s])) for s in SHAPES]


def color_of_shape(scene: Scene) -> list[tuple[str, str]]:
    """ "what color is the <shape>?" for each shape that ``scene`` (or any list of objects, such
    as one quadrant's) holds exactly once."""
    return [
        (f"what color is the {s}?", matches[0].color)
        for s in SHAPES
        if len(matches := [o for o in scene if o.shape == s]) == 1
    ]


def shape_of_color(scene: Scene) -> list[tuple[str, str]]:
    """ "what shape is the <colour> object?" for each colour ``scene`` holds exactly once."""
    return [
        (f"what shape is the {c} object?", matches[0].shape)
        for c in COLORS
        if len(matches := [o for o in scene if o.color == c]) == 1
    ]


def _color_beside(scene: Scene) -> list[tuple[str, str]]:
    # "the shape left of X" is only asked when exactly one object's centre is left of X's.
    out = []
    for ref in _unique(scene):
        for rel, side in (
            ("left of", [o for o in scene if o.x < ref.x]),
            ("right of", [o for o in scene if o.x > ref.x]),
        ):
            if len(side) == 1:
                out.append(
                    (f"what color is the shape {rel} the {ref.color} {ref.shape}?", side[0].color)
                )
    return out


# What a question is keyed by while sampling: its text, or where a set asks one text under
# several conditions (shapes_prior's quadrants), a tuple that also names the condition.
QuestionKey = Any


@dataclass(frozen=True)
class Family:
    """A question template: its VQA question/answer type, candidates per scene, answer space.

    ``candidates`` maps what one item shows (a scene here; a pair of scenes in shapes_pair)
    to every (question, answer) the family can ask of it.
    """

    name: str
    question_type: str
    answer_type: str
    candidates: Callable[[Any], list[tuple[QuestionKey, str]]]
    answers: tuple[str, ...]


_COUNTS = tuple(str(n) for n in range(MAX_OBJECTS + 1))
FAMILIES: tuple[Family, ...] = (
    Family("exists", "is there a", "yes/no", _exists, ("yes", "no")),
    Family("relation", "is the", "yes/no", _relation, ("yes", "no")),
    Family("count_color", "how many", "number", _count_color, _COUNTS),
    Family("count_shape", "how many", "number", _count_shape, _COUNTS),
    Family("color_of_shape", "what color is the", "other", color_of_shape, tuple(COLORS)),
    Family("shape_of_color", "what shape is the", "other", shape_of_color, SHAPES),
    Family("color_beside", "what color is the", "other", _color_beside, tuple(COLORS)),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_OBJECT = rf"(?:{_COLOR}) (?:{_SHAPE})"
# One pattern per family, matching exactly the questions its ``candidates`` writes.
FAMILY_PATTERNS: dict[str, re.Pattern[str]] = {
    "exists": re.compile(rf"is there a {_OBJECT}\?"),
    "relation": re.compile(rf"is the {_OBJECT} (?:left|right) of the {_OBJECT}\?"),
    "count_color": re.compile(rf"how many (?:{_COLOR}) shapes are there\?"),
    "count_shape": re.compile(rf"how many (?:{_SHAPE})s are there\?"),
    "color_of_shape": re.compile(rf"what color is the (?:{_SHAPE})\?"),
    "shape_of_color": re.compile(rf"what shape is the (?:{_COLOR}) object\?"),
    "color_beside": re.compile(rf"what color is the shape (?:left|right) of the {_OBJECT}\?"),
}


def family_of(question: str) -> str:
    """The family that wrote ``question`` (finer than VQA's answer types: "color_beside" is
    the relational part of "other"); raises ValueError for text no family writes."""
    for name, pattern in FAMILY_PATTERNS.items():
        if pattern.fullmatch(question):
            return name
    raise ValueError(f"{question!r} is not a synthetic shapes question")


@dataclass(frozen=True)
class Question:
    family: Family
    question: QuestionKey
    answer: str


class QuestionSampler:
    """Picks questions per scene so that families and, within each, answers stay balanced.

    Greedy: the least-asked family that still has an unasked candidate, then its least-given
    answer that this scene supports. Counts run over a whole split, so "no" follows "yes" and
    a rare count is taken whenever a scene offers it.

    ``spread``: at most this many questions of one family per item while another family still
    has a candidate there, so a family that few items allow (it lags, so it would be picked
    every time) is not asked all of an item's questions. None (the default set): no limit.
    """

    def __init__(
        self,
        rng: random.Random,
        families: tuple[Family, ...] = FAMILIES,
        spread: int | None = None,
    ) -> None:
        self.rng = rng
        self.spread = spread
        self.families = families
        self.family_by_name = {f.name: f for f in families}
        self.family_counts: Counter[str] = Counter()
        self.answer_counts: dict[str, Counter[str]] = {f.name: Counter() for f in families}

    def _least_used(self, options: list[str], counts: Counter[str]) -> str:
        options = sorted(options)
        self.rng.shuffle(options)  # random tie-break among equally used options
        return min(options, key=lambda option: counts[option])

    def sample(self, scene: Any, n: int) -> list[Question]:
        pending = {f.name: f.candidates(scene) for f in self.families}
        asked: list[Question] = []
        per_item: Counter[str] = Counter()
        for _ in range(n):
            open_families = [name for name, cands in pending.items() if cands]
            if not open_families:
                break
            if self.spread is not None:
                spread = [name for name in open_families if per_item[name] < self.spread]
                open_families = spread or open_families
            name = self._least_used(open_families, self.family_counts)
            cands = pending[name]
            answer = self._least_used(list({a for _, a in cands}), self.answer_counts[name])
            question = self.rng.choice(sorted(q for q, a in cands if a == answer))
            pending[name] = [(q, a) for q, a in cands if q != question]
            self.family_counts[name] += 1
            per_item[name] += 1
            self.answer_counts[name][answer] += 1
            asked.append(Question(self.family_by_name[name], question, answer))
        return asked


# --------------------------------------------------------------------------- simulated annotators


def answer_variants(answer: str) -> list[str]:
    """Spellings a human might type that the official normalisation maps back to ``answer``."""
    variants = [answer.capitalize(), answer.upper(), f"{answer}.", f"{answer.capitalize()}!"]
    if answer.isdigit():
        word = NUMBER_WORDS[int(answer)]
        variants += [word, word.capitalize()]
    if answer in SHAPES:
        variants += [f"a {answer}", f"the {answer}", f"A {answer}."]
    return sorted(set(variants) - {answer})


def _wrong_answers(family: Family, answer: str) -> list[str]:
    """Plausible mistakes: the other yes/no, a neighbouring count, another colour or shape."""
    if family.answer_type == "number":
        n = int(answer)
        return [str(m) for m in (n - 1, n + 1) if str(m) in family.answers]
    return [a for a in family.answers if a != answer]


def human_answers(rng: random.Random, family: Family, answer: str) -> list[dict[str, Any]]:
    """Ten annotator records; at least seven agree (after normalisation) on ``answer``."""
    n_wrong = rng.choices((0, 1, 2, 3), weights=(45, 30, 15, 10))[0]
    n_variant = rng.randint(0, 3)
    variants, wrong = answer_variants(answer), _wrong_answers(family, answer)
    given = (
        [(answer, "yes")] * (10 - n_wrong - n_variant)
        + [(rng.choice(variants), "yes") for _ in range(n_variant)]
        + [(rng.choice(wrong), rng.choice(("maybe", "yes", "no"))) for _ in range(n_wrong)]
    )
    rng.shuffle(given)
    return [
        {"answer": text, "answer_confidence": confidence, "answer_id": i}
        for i, (text, confidence) in enumerate(given, start=1)
    ]


# --------------------------------------------------------------------------- writing the set

_INFO = {
    "description": "coattn-vqa synthetic shapes set, VQA v2 format",
    "version": str(GENERATOR_VERSION),
    "contributor": "vqa.data.shapes",
}
_LICENSE = {"name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compact and key-ordered as built: byte-identical output for the same seed.
    path.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")


def save_image(scene: Scene, image_size: int, path: Path) -> None:
    """Render ``scene`` to ``path`` as every synthetic set stores its images."""
    render_scene(scene, image_size).save(path, format="JPEG", quality=90, subsampling=0)


def annotation_record(
    rng: random.Random, question: Question, image_id: int, question_id: int
) -> dict[str, Any]:
    """The VQA v2 annotation of one asked question, with its ten simulated human answers."""
    return {
        "question_type": question.family.question_type,
        # The canonical answer is, by construction, the most common normalised one.
        "multiple_choice_answer": question.answer,
        "answers": human_answers(rng, question.family, question.answer),
        "image_id": image_id,
        "answer_type": question.family.answer_type,
        "question_id": question_id,
        # Not in VQA v2: the template, finer than the answer type (see family_of)
        "question_family": question.family.name,
    }


def write_split_files(
    root: Path,
    split: str,
    info: dict[str, str],
    questions: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    scenes: dict[str, Any],
) -> None:
    """Write a split's questions and annotations (the VQA v2 files) and its scene metadata."""
    header = {"info": info, "license": _LICENSE, "data_type": "mscoco", "data_subtype": split}
    _write_json(
        split_layout(root, split).questions,
        {**header, "task_type": "Open-Ended", "questions": questions},
    )
    _write_json(annotations_path(root, split), {**header, "annotations": annotations})
    _write_json(scenes_path(root, split), scenes)


def _generate_split(
    root: Path, split: str, num_images: int, first_image_id: int, config: ShapesConfig
) -> dict[str, int]:
    """Write one split's images, questions, annotations and scene metadata."""
    # One stream per split: resizing one split leaves the others' content unchanged.
    rng = random.Random(f"shapes-v{STREAM_VERSION}-seed{config.seed}-{split}")
    sampler = QuestionSampler(rng)
    layout = split_layout(root, split)
    layout.image_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations, scenes = [], [], []
    for image_id in range(first_image_id, first_image_id + num_images):
        scene = sample_scene(rng, config.image_size)
        save_image(scene, config.image_size, layout.image_path(image_id))
        scenes.append({"image_id": image_id, "objects": [asdict(o) for o in scene]})
        for k, q in enumerate(sampler.sample(scene, config.questions_per_image)):
            question_id = image_id * 1000 + k  # the VQA v2 convention
            questions.append(
                {"image_id": image_id, "question": q.question, "question_id": question_id}
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


def scenes_path(root: str | Path, split: str) -> Path:
    """The scene metadata file of a split (objects with shape, colour, size, centre, radius)."""
    return Path(root) / "Scenes" / f"shapes_{split}_scenes.json"


@dataclass(frozen=True)
class SetGenerator:
    """One synthetic set's writer, as :func:`generate`, :func:`is_current` and the CLI use it.

    ``write_split(root, split, num_items, first_item, config)`` writes a split's files and
    returns its counts; items are numbered on across the splits from 1, so image ids never
    repeat between splits. ``name`` (the module) and ``version`` are recorded in the manifest:
    a set made by another generator or version is stale.
    """

    name: str
    version: int
    write_split: Callable[[Path, str, int, int, ShapesConfig], dict[str, int]]


SHAPES_SET = SetGenerator(GENERATOR, GENERATOR_VERSION, _generate_split)


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_current(
    root: str | Path, config: ShapesConfig, generator: SetGenerator = SHAPES_SET
) -> bool:
    """Whether ``root`` holds a complete set made by this generator version with ``config``."""
    manifest = read_manifest(root)
    return (
        manifest is not None
        and manifest.get("generator") == generator.name
        and manifest.get("version") == generator.version
        and manifest.get("config") == asdict(config)
    )


def generate(
    root: str | Path, config: ShapesConfig, generator: SetGenerator = SHAPES_SET
) -> dict[str, Any]:
    """Write the set to ``root`` (replacing a previous synthetic set there); return its manifest.

    Built in a sibling temporary folder and moved into place at the end, so an interrupted run
    never leaves a half-written set that looks complete. The manifest, written last, records
    the parameters so a stale cache is detected.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()) and read_manifest(root) is None:
        raise FileExistsError(
            f"{root} is not empty and holds no {MANIFEST_NAME}: refusing to overwrite what is "
            "not a synthetic set; choose another folder"
        )
    tmp = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    splits, next_item = {}, 1
    for split, num_items in config.split_sizes().items():
        splits[split] = generator.write_split(tmp, split, num_items, next_item, config)
        next_item += num_items
    manifest = {
        "generator": generator.name,
        "version": generator.version,
        "config": asdict(config),
        "splits": splits,
    }
    _write_json(tmp / MANIFEST_NAME, manifest)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return manifest


def ensure_generated(
    root: str | Path, config: ShapesConfig, generator: SetGenerator = SHAPES_SET
) -> bool:
    """Generate the set unless an up-to-date one is already there; True if it generated."""
    if is_current(root, config, generator):
        return False
    start = time.perf_counter()
    manifest = generate(root, config, generator)
    total = sum(s["questions"] for s in manifest["splits"].values())
    log.info(
        "generated synthetic set (%s) in %s: %d questions in %.1f s",
        generator.name,
        root,
        total,
        time.perf_counter() - start,
    )
    return True


def iter_scenes(root: str | Path, split: str) -> Iterator[tuple[int, Scene]]:
    """(image_id, scene) pairs of a generated split, to re-derive answers in tests and tools."""
    payload = json.loads(scenes_path(root, split).read_text(encoding="utf-8"))
    for item in payload["scenes"]:
        yield item["image_id"], [SceneObject(**o) for o in item["objects"]]


def run_cli(argv: list[str] | None, generator: SetGenerator, description: str) -> None:
    """``python -m <generator module> --out DIR [--seed N ...]``: write the set unless current."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="data root to write")
    for f in fields(ShapesConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    config = ShapesConfig(**{f.name: getattr(args, f.name) for f in fields(ShapesConfig)})
    start = time.perf_counter()
    if args.force or not is_current(args.out, config, generator):
        manifest = generate(args.out, config, generator)
        print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s: {manifest['splits']}")
    else:
        print(f"{args.out} is up to date ({MANIFEST_NAME} matches); use --force to regenerate")


def main(argv: list[str] | None = None) -> None:
    run_cli(argv, SHAPES_SET, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
