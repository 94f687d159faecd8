"""The synthetic variants: shapes_pair (two images per question) and shapes_prior (a quadrant
label per question). Determinism, the extended VQA v2 records, answers re-derived from the
scenes, balance, what a single image or a missing label leaves open, and the sources."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from scripts.shapes_breakdown import main as breakdown
from scripts.shapes_breakdown import prior_guesses, quadrant_answers
from vqa.data import shapes, shapes_pair, shapes_prior
from vqa.data.answers import vqa_accuracy
from vqa.data.errors import BadRecordLog, DataError
from vqa.data.layout import split_layout
from vqa.data.shapes import (
    COLORS,
    MANIFEST_NAME,
    SHAPES,
    SceneObject,
    ShapesConfig,
    generate,
    is_current,
    iter_scenes,
    read_manifest,
    sample_scene,
)
from vqa.data.shapes_pair import SHAPES_PAIR_SET, iter_pairs
from vqa.data.shapes_prior import QUADRANTS, SHAPES_PRIOR_SET, quadrant_of
from vqa.data.sources import ShapesPairSource, ShapesPriorSource, ShapesSource

SPLITS = ("train2014", "val2014", "test2015")
TINY = ShapesConfig(20, 5, 5, questions_per_image=6, image_size=48, seed=3)
# Big enough for answer statistics, small pixels so it renders in about a second.
STATS = ShapesConfig(300, 60, 0, questions_per_image=6, image_size=32, seed=1)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def load(root: Path, split: str) -> tuple[list[dict], dict[int, dict]]:
    layout = split_layout(root, split)
    questions = json.loads(layout.questions.read_text())["questions"]
    annotations = json.loads(layout.annotations.read_text())["annotations"]
    return questions, {a["question_id"]: a for a in annotations}


@pytest.fixture(scope="module")
def pair_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pair") / "shapes_pair"
    generate(root, TINY, SHAPES_PAIR_SET)
    return root


@pytest.fixture(scope="module")
def prior_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prior") / "shapes_prior"
    generate(root, TINY, SHAPES_PRIOR_SET)
    return root


@pytest.fixture(scope="module")
def pair_stats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pair_stats") / "shapes_pair"
    generate(root, STATS, SHAPES_PAIR_SET)
    return root


@pytest.fixture(scope="module")
def prior_stats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prior_stats") / "shapes_prior"
    generate(root, STATS, SHAPES_PRIOR_SET)
    return root


# --------------------------------------------------------------------------- independent solvers

_C, _S = "|".join(COLORS), "|".join(SHAPES)


def pair_answer(question: str, left: list[SceneObject], right: list[SceneObject]) -> str | None:
    """The answer over the two scenes; None where a referent is absent or not unique."""
    sides = {"left": left, "right": right}

    def the(side: str, shape: str) -> SceneObject | None:
        matches = [o for o in sides[side] if o.shape == shape]
        return matches[0] if len(matches) == 1 else None

    if m := re.fullmatch(
        rf"are there more ({_C}) shapes in the (left|right) image than in the (left|right) one\?",
        question,
    ):
        assert m[2] != m[3]
        count = {side: sum(o.color == m[1] for o in objs) for side, objs in sides.items()}
        return "yes" if count[m[2]] > count[m[3]] else "no"
    if m := re.fullmatch(
        rf"is the ({_S}) in the (left|right) image the same color as the ({_S}) in the "
        r"(left|right) one\?",
        question,
    ):
        assert m[2] != m[4]
        a, b = the(m[2], m[1]), the(m[4], m[3])
        return None if a is None or b is None else ("yes" if a.color == b.color else "no")
    if m := re.fullmatch(rf"how many ({_S})s are there in the two images\?", question):
        return str(sum(o.shape == m[1] for o in left + right))
    if m := re.fullmatch(rf"how many ({_C}) shapes are there in the two images\?", question):
        return str(sum(o.color == m[1] for o in left + right))
    if m := re.fullmatch(rf"what color is the ({_S}) in the (left|right) image\?", question):
        obj = the(m[2], m[1])
        return None if obj is None else obj.color
    raise AssertionError(f"unknown pair template: {question!r}")


def quadrant_answer(question: str, objects: list[SceneObject]) -> str | None:
    """The answer over one quadrant's objects; None where the referent is not unique there."""
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(rf"how many ({_S})s are there\?", question):
        return str(sum(o.shape == m[1] for o in objects))
    if m := re.fullmatch(rf"is there a ({_C}) shape\?", question):
        return "yes" if any(o.color == m[1] for o in objects) else "no"
    if m := re.fullmatch(rf"is there a ({_S})\?", question):
        return "yes" if any(o.shape == m[1] for o in objects) else "no"
    if m := re.fullmatch(rf"what color is the ({_S})\?", question):
        matches = [o for o in objects if o.shape == m[1]]
        return matches[0].color if len(matches) == 1 else None
    if m := re.fullmatch(rf"what shape is the ({_C}) object\?", question):
        matches = [o for o in objects if o.color == m[1]]
        return matches[0].shape if len(matches) == 1 else None
    raise AssertionError(f"unknown quadrant template: {question!r}")


def by_quadrant(scene: list[SceneObject], image_size: int) -> dict[str, list[SceneObject]]:
    return {q: [o for o in scene if quadrant_of(o, image_size) == q] for q in QUADRANTS}


# --------------------------------------------------------------------------- both variants

GENERATORS = {"pair": SHAPES_PAIR_SET, "prior": SHAPES_PRIOR_SET}


@pytest.mark.parametrize("name", GENERATORS)
def test_same_seed_is_byte_identical_and_another_seed_differs(name: str, tmp_path: Path) -> None:
    generator = GENERATORS[name]
    generate(tmp_path / "a", TINY, generator)
    generate(tmp_path / "b", TINY, generator)
    generate(tmp_path / "c", ShapesConfig(**{**TINY.__dict__, "seed": 4}), generator)
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert any(a[n] != c[n] for n in a if n.endswith("questions.json"))
    assert read_manifest(tmp_path / "a")["generator"] == generator.name


def test_each_set_is_current_only_for_its_own_generator(pair_tiny: Path, prior_tiny: Path) -> None:
    assert is_current(pair_tiny, TINY, SHAPES_PAIR_SET)
    assert not is_current(pair_tiny, TINY, SHAPES_PRIOR_SET)
    assert not is_current(pair_tiny, TINY)  # the default set's generator
    assert is_current(prior_tiny, TINY, SHAPES_PRIOR_SET)
    with pytest.raises(DataError, match=r"python -m vqa\.data\.shapes_prior"):
        ShapesPriorSource(**TINY.__dict__).load_split(pair_tiny, "val2014", BadRecordLog("error"))


@pytest.mark.parametrize("module", [shapes_pair, shapes_prior], ids=["pair", "prior"])
def test_every_question_matches_exactly_one_family(module: ModuleType) -> None:
    rng = random.Random(5)
    seen: Counter[str] = Counter()
    for _ in range(80):
        scene = sample_scene(rng, 128, 5, 8, shapes_prior.inside_one_quadrant(128))
        item: Any = (
            (sample_scene(rng, 128), sample_scene(rng, 128))
            if module is shapes_pair
            else shapes_prior.split_quadrants(scene, 128)
        )
        for family in module.FAMILIES:
            for question, _ in family.candidates(item):
                text = question if isinstance(question, str) else question[0]
                matching = [n for n, p in module.FAMILY_PATTERNS.items() if p.fullmatch(text)]
                assert matching == [family.name], text
                assert module.family_of(text) == family.name
                seen[family.name] += 1
    assert set(seen) == {f.name for f in module.FAMILIES}
    with pytest.raises(ValueError, match="not a synthetic"):
        module.family_of("is there a red circle?")


# --------------------------------------------------------------------------- shapes_pair


def test_pair_records_name_two_distinct_existing_images(pair_tiny: Path) -> None:
    all_ids: set[int] = set()
    for split, num_pairs in TINY.split_sizes().items():
        layout = split_layout(pair_tiny, split)
        questions, annotations = load(pair_tiny, split)
        assert len(questions) == 6 * num_pairs
        assert len({q["image_id"] for q in questions}) == num_pairs
        scenes = dict(iter_scenes(pair_tiny, split))
        for q in questions:
            assert list(q) == ["image_id", "question", "question_id", "image_ids"]
            ids = q["image_ids"]
            assert list(ids) == ["left", "right"]
            assert q["image_id"] == ids["left"] == ids["right"] - 1 and ids["left"] % 2 == 0
            assert q["question_id"] // 1000 == q["image_id"]
            for image_id in ids.values():
                assert layout.image_path(image_id).read_bytes()[:3] == b"\xff\xd8\xff"
            assert scenes[ids["left"]] != scenes[ids["right"]]
            assert layout.image_path(ids["left"]).read_bytes() != (
                layout.image_path(ids["right"]).read_bytes()
            )
            a = annotations[q["question_id"]]
            assert a["image_id"] == q["image_id"]
            assert a["question_family"] == shapes_pair.family_of(q["question"])
            assert [h["answer_id"] for h in a["answers"]] == list(range(1, 11))
        split_ids = set(scenes)
        assert not split_ids & all_ids, split  # no image is shared between splits
        all_ids |= split_ids


def test_pair_answers_are_rederived_from_the_scenes(pair_stats: Path) -> None:
    for split in ("train2014", "val2014"):
        pairs = iter_pairs(pair_stats, split)
        questions, annotations = load(pair_stats, split)
        for q in questions:
            left, right = pairs[q["image_id"]]
            expected = annotations[q["question_id"]]["multiple_choice_answer"]
            assert pair_answer(q["question"], left, right) == expected, q


def test_pair_answers_are_balanced_within_each_family(pair_stats: Path) -> None:
    _, annotations = load(pair_stats, "train2014")
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for a in annotations.values():
        counts[a["question_family"]][a["multiple_choice_answer"]] += 1
    assert set(counts) == {f.name for f in shapes_pair.FAMILIES}
    for family in ("more_color", "same_color"):
        assert abs(counts[family]["yes"] - counts[family]["no"]) <= 2, counts[family]
    colors = list(counts["color_in"].values())
    assert len(colors) == len(COLORS) and max(colors) - min(colors) <= 0.1 * max(colors)
    common = [counts["count_both"][str(n)] for n in range(5)]
    assert max(common) - min(common) <= 2, counts["count_both"]


def test_the_left_image_alone_settles_few_pair_questions(pair_stats: Path) -> None:
    # A question is settled by its left image when every other right image (where the
    # question is well posed) gives the same answer; only "what color is the <shape> in the
    # left image?" and a few "more ... in the left image" with none of that colour there are.
    pairs = iter_pairs(pair_stats, "train2014")
    other_rights = [right for _, right in list(pairs.values())[:60]]
    questions, _ = load(pair_stats, "train2014")
    settled: Counter[str] = Counter()
    for q in questions:
        left, right = pairs[q["image_id"]]
        answers = {pair_answer(q["question"], left, r) for r in [right, *other_rights]} - {None}
        settled[shapes_pair.family_of(q["question"])] += len(answers) == 1
    assert sum(settled.values()) < 0.3 * len(questions), settled
    assert settled["count_both"] == settled["same_color"] == 0, settled


# --------------------------------------------------------------------------- shapes_prior


def test_prior_records_carry_a_quadrant(prior_tiny: Path) -> None:
    for split in SPLITS:
        questions, annotations = load(prior_tiny, split)
        assert len(questions) == 6 * TINY.split_sizes()[split]
        for q in questions:
            assert list(q) == ["image_id", "question", "question_id", "quadrant"]
            assert q["quadrant"] in QUADRANTS
            assert split_layout(prior_tiny, split).image_path(q["image_id"]).is_file()
            a = annotations[q["question_id"]]
            assert a["image_id"] == q["image_id"]
            assert a["question_family"] == shapes_prior.family_of(q["question"])


def test_prior_answers_are_about_the_quadrant_only(prior_stats: Path) -> None:
    size = STATS.image_size
    scenes = dict(iter_scenes(prior_stats, "train2014"))
    questions, annotations = load(prior_stats, "train2014")
    answers_by_text: dict[tuple[int, str], set[str]] = defaultdict(set)
    for q in questions:
        quadrants = by_quadrant(scenes[q["image_id"]], size)
        per_quadrant = {k: quadrant_answer(q["question"], objs) for k, objs in quadrants.items()}
        answer = annotations[q["question_id"]]["multiple_choice_answer"]
        assert per_quadrant[q["quadrant"]] == answer, q
        # where the text is well posed, some other quadrant answers it differently
        assert len(set(per_quadrant.values()) - {None}) > 1, (q, per_quadrant)
        answers_by_text[q["image_id"], q["question"]].add(answer)
    # the same text asked twice of one image, about two quadrants, with two answers
    assert any(len(answers) > 1 for answers in answers_by_text.values())
    for scene in scenes.values():
        assert shapes_prior.MIN_OBJECTS <= len(scene) <= shapes_prior.MAX_OBJECTS
        for o in scene:  # wholly inside one quadrant
            assert min(abs(o.x - size / 2), abs(o.y - size / 2)) >= o.extent


def test_prior_answers_are_balanced_within_each_family(prior_stats: Path) -> None:
    _, annotations = load(prior_stats, "train2014")
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for a in annotations.values():
        counts[a["question_family"]][a["multiple_choice_answer"]] += 1
    assert set(counts) == {f.name for f in shapes_prior.FAMILIES}
    assert abs(counts["exists_in"]["yes"] - counts["exists_in"]["no"]) <= 2
    for family, space in (("color_in", COLORS), ("shape_in", SHAPES)):
        values = [counts[family][a] for a in space]
        assert max(values) - min(values) <= 0.1 * max(values), counts[family]
    common = [counts["count_in"][str(n)] for n in range(3)]
    assert max(common) - min(common) <= 2, counts["count_in"]


# --------------------------------------------------------------------------- the default set

# What the default set wrote before the variants shared its code (every JSON file of every
# split for this config; the JPEGs and manifest aside, as test_shapes.py's V1_CONTENT does).
DEFAULT_CONTENT = "15760496face65c1c00f425c50cc046319a1e59e302535719db3c3cc03308877"


def test_the_default_set_is_unchanged(tmp_path: Path) -> None:
    generate(tmp_path, ShapesConfig(6, 3, 3, questions_per_image=6, image_size=40, seed=11))
    digest = hashlib.sha256()
    for path in sorted(tmp_path.rglob("*.json")):
        if path.name != MANIFEST_NAME:
            digest.update(str(path.relative_to(tmp_path)).encode())
            digest.update(path.read_bytes())
    assert digest.hexdigest() == DEFAULT_CONTENT
    assert read_manifest(tmp_path)["generator"] == "vqa.data.shapes"


# --------------------------------------------------------------------------- sources, CLI, tools


def test_sources_load_the_streams_and_the_quadrant(pair_tiny: Path, prior_tiny: Path) -> None:
    bad = BadRecordLog("error")
    pair = ShapesPairSource(**TINY.__dict__)
    pair.prepare(pair_tiny)  # up to date: nothing regenerated
    table = pair.load_split(pair_tiny, "val2014", bad, streams=["left", "right"]).table
    for image_id, image_ids in zip(table["image_id"], table["image_ids"], strict=True):
        assert image_ids == [image_id, image_id + 1]
    table = (
        ShapesPriorSource(**TINY.__dict__)
        .load_split(prior_tiny, "test2015", bad, conditioning_fields=["quadrant"])
        .table
    )
    questions, _ = load(prior_tiny, "test2015")
    assert [c[0] for c in table["conditioning"]] == [q["quadrant"] for q in questions]


def test_every_shapes_source_passes_read_options_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = []
    monkeypatch.setattr(
        "vqa.data.sources.load_vqav2_split", lambda *args, **kwargs: seen.append(kwargs)
    )
    small = ShapesConfig(2, 1, 1, questions_per_image=2, image_size=32, seed=0)
    for source in (ShapesSource(**small.__dict__), ShapesPairSource(**small.__dict__),
                   ShapesPriorSource(**small.__dict__)):  # fmt: skip
        root = tmp_path / type(source).__name__
        source.prepare(root)
        assert is_current(root, small, source.generator)
        source.load_split(root, "train2014", BadRecordLog("error"), streams=None, x=1)
    assert seen == [{"streams": None, "x": 1}] * 3


@pytest.mark.parametrize("module", [shapes_pair, shapes_prior], ids=["pair", "prior"])
def test_cli(module: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path / "cli"), "--num-train-images", "2", "--num-val-images", "1",
            "--num-test-images", "1", "--image-size", "40", "--seed", "3"]  # fmt: skip
    module.main(args)
    assert "train2014" in capsys.readouterr().out
    assert read_manifest(tmp_path / "cli")["generator"] == module.GENERATOR
    module.main(args)
    assert "up to date" in capsys.readouterr().out


FLOORS = ["question-only prior", "image-only prior"]


def table_rows(table: str) -> dict[str, dict[str, float]]:
    """A breakdown markdown table as run label -> column -> percent."""
    header, _, *rows = table.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return {
        row[0]: {c: float(v) for c, v in zip(columns[1:], row[1:], strict=True) if v}
        for row in cells
    }


@pytest.mark.parametrize(
    ("fixture", "module", "ceilings"),
    [
        ("pair_tiny", shapes_pair, ["left image only (ceiling)", "right image only (ceiling)"]),
        ("prior_tiny", shapes_prior, ["no quadrant (ceiling)"]),
    ],
)
def test_breakdown_scores_the_variants_blind_floors_by_family(
    fixture: str, module: ModuleType, ceilings: list[str], request: pytest.FixtureRequest
) -> None:
    root = request.getfixturevalue(fixture)
    header, _, *rows = breakdown(["--priors", "--root", str(root)]).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[5:] == [f.name for f in module.FAMILIES]
    assert [r.split("|")[1].strip() for r in rows] == FLOORS + ceilings
    with pytest.raises(SystemExit):  # --data must name a known set
        breakdown(["--priors", "--root", str(root), "--data", "vqav2"])
    assert shapes.GENERATOR == "vqa.data.shapes"


def test_single_image_ceiling_sees_one_image_fully_and_the_other_not(pair_stats: Path) -> None:
    rows = table_rows(breakdown(["--priors", "--root", str(pair_stats)]))
    for side in ("left", "right"):
        ceiling = rows[f"{side} image only (ceiling)"]
        assert rows["question-only prior"]["overall"] <= ceiling["overall"] <= 100, ceiling
        # one image never settles a match with the other's colour, nor the two images' count
        assert ceiling["same_color"] < 80 and ceiling["count_both"] < 80, ceiling
    guess = prior_guesses(pair_stats, "val2014", "shapes_pair")["left image only (ceiling)"]
    questions, annotations = load(pair_stats, "val2014")
    color_in = {
        side: [
            q
            for q in questions
            if re.fullmatch(rf"what color is .* the {side} image\?", q["question"])
        ]
        for side in ("left", "right")
    }
    assert color_in["left"] and color_in["right"]
    # The left image settles "what color is the <shape> in the left image?" ...
    for q in color_in["left"]:
        humans = [h["answer"] for h in annotations[q["question_id"]]["answers"]]
        assert vqa_accuracy(guess(q), humans) == 1.0, q
    # ... and says nothing about the right image: one answer for all of those.
    assert len({guess(q) for q in color_in["right"]}) == 1


def test_no_quadrant_ceiling_is_below_full_marks(prior_stats: Path) -> None:
    questions, annotations = load(prior_stats, "val2014")
    scenes = dict(iter_scenes(prior_stats, "val2014"))
    answers = quadrant_answers(prior_stats, {"val2014"})
    for q in questions:  # the generator's writers agree with the independent solver
        quadrants = by_quadrant(scenes[q["image_id"]], STATS.image_size)
        per_quadrant = [quadrant_answer(q["question"], objs) for objs in quadrants.values()]
        assert answers[q["image_id"], q["question"]] == [a for a in per_quadrant if a is not None]
        assert annotations[q["question_id"]]["multiple_choice_answer"] in per_quadrant
    rows = table_rows(breakdown(["--priors", "--root", str(prior_stats)]))
    ceiling = rows["no quadrant (ceiling)"]
    # the image alone leaves the quadrant's answer open, but narrows it down beyond the text
    assert rows["question-only prior"]["overall"] < ceiling["overall"] < 90, rows
    for family in shapes_prior.FAMILIES:
        assert ceiling[family.name] < 100, ceiling
