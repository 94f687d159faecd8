"""The synthetic generator: determinism, VQA v2 schema, unique and balanced answers, noise."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from vqa.data.answers import normalize_answer, vqa_accuracy
from vqa.data.layout import split_layout
from vqa.data.shapes import (
    COLORS,
    FAMILIES,
    MANIFEST_NAME,
    SHAPES,
    SceneObject,
    ShapesConfig,
    ensure_generated,
    family_of,
    generate,
    is_current,
    iter_scenes,
    main,
    sample_scene,
    scenes_path,
)

TINY = ShapesConfig(
    num_train_images=12,
    num_val_images=4,
    num_test_images=3,
    questions_per_image=5,
    image_size=48,
    seed=7,
)
# Big enough for answer statistics, small pixels so it renders in about a second.
STATS = ShapesConfig(
    num_train_images=400, num_val_images=150, num_test_images=0, image_size=32, seed=1
)


@pytest.fixture(scope="module")
def stats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stats") / "shapes"
    generate(root, STATS)
    return root


def load(root: Path, split: str) -> tuple[list[dict], dict[int, dict]]:
    layout = split_layout(root, split)
    questions = json.loads(layout.questions.read_text())["questions"]
    annotations = (
        json.loads(layout.annotations.read_text())["annotations"] if layout.annotations else []
    )
    return questions, {a["question_id"]: a for a in annotations}


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path: Path) -> None:
    generate(tmp_path / "a", TINY)
    generate(tmp_path / "b", TINY)
    generate(tmp_path / "c", ShapesConfig(**{**TINY.__dict__, "seed": 8}))
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()  # same layout and file names ...
    changed = [name for name in a if a[name] != c[name] and name != MANIFEST_NAME]
    # ... but other questions and other pixels
    assert any(name.endswith("questions.json") for name in changed)
    assert sum(name.endswith(".jpg") for name in changed) == 12 + 4 + 3


def test_official_layout_and_schema(tmp_path: Path) -> None:
    manifest = generate(tmp_path, TINY)
    assert manifest["splits"]["train2014"] == {"images": 12, "questions": 60}
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["config"]["seed"] == 7
    for split in ("train2014", "val2014", "test2015"):
        layout = split_layout(tmp_path, split)
        payload = json.loads(layout.questions.read_text())
        assert payload["data_subtype"] == split and payload["task_type"] == "Open-Ended"
        for q in payload["questions"]:
            assert set(q) == {"image_id", "question", "question_id"}
            assert q["question_id"] // 1000 == q["image_id"]
            assert layout.image_path(q["image_id"]).is_file()
    for split in ("train2014", "val2014", "test2015"):
        questions, annotations = load(tmp_path, split)
        assert sorted(annotations) == sorted(q["question_id"] for q in questions)
    questions, annotations = load(tmp_path, "val2014")
    for q in questions:  # the one field VQA v2 lacks: the template that wrote the question
        assert annotations[q["question_id"]]["question_family"] == family_of(q["question"])
    for a in annotations.values():
        assert set(a) == {
            "question_type",
            "multiple_choice_answer",
            "answers",
            "image_id",
            "answer_type",
            "question_id",
            "question_family",
        }
        assert [h["answer_id"] for h in a["answers"]] == list(range(1, 11))
        assert {h["answer_confidence"] for h in a["answers"]} <= {"yes", "maybe", "no"}
        assert a["answer_type"] in ("yes/no", "number", "other")
    image = split_layout(tmp_path, "train2014").image_path(1)
    assert image.read_bytes()[:3] == b"\xff\xd8\xff"  # real JPEG


def recompute(question: str, scene: list[SceneObject]) -> str:
    """An independent solver for every template; it asserts each question is well posed."""
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)

    def the(color: str, shape: str) -> SceneObject:
        matches = [o for o in scene if o.color == color and o.shape == shape]
        assert len(matches) == 1, f"'the {color} {shape}' is ambiguous or absent in {question!r}"
        return matches[0]

    if m := re.fullmatch(rf"is there a ({colors}) ({shapes})\?", question):
        return "yes" if any(o.color == m[1] and o.shape == m[2] for o in scene) else "no"
    if m := re.fullmatch(
        rf"is the ({colors}) ({shapes}) (left|right) of the ({colors}) ({shapes})\?", question
    ):
        a, b = the(m[1], m[2]), the(m[4], m[5])
        return "yes" if (a.x < b.x) == (m[3] == "left") else "no"
    if m := re.fullmatch(rf"how many ({colors}) shapes are there\?", question):
        return str(sum(o.color == m[1] for o in scene))
    if m := re.fullmatch(rf"how many ({shapes})s are there\?", question):
        return str(sum(o.shape == m[1] for o in scene))
    if m := re.fullmatch(rf"what color is the ({shapes})\?", question):
        (only,) = [o for o in scene if o.shape == m[1]]
        return only.color
    if m := re.fullmatch(rf"what shape is the ({colors}) object\?", question):
        (only,) = [o for o in scene if o.color == m[1]]
        return only.shape
    if m := re.fullmatch(
        rf"what color is the shape (left|right) of the ({colors}) ({shapes})\?", question
    ):
        ref = the(m[2], m[3])
        (only,) = [o for o in scene if (o.x < ref.x if m[1] == "left" else o.x > ref.x)]
        return only.color
    raise AssertionError(f"unknown question template: {question!r}")


def test_every_answer_is_unique_and_rederivable_from_the_scene(stats_root: Path) -> None:
    for split in ("train2014", "val2014"):
        scenes = dict(iter_scenes(stats_root, split))
        questions, annotations = load(stats_root, split)
        for q in questions:
            assert (
                recompute(q["question"], scenes[q["image_id"]])
                == annotations[q["question_id"]]["multiple_choice_answer"]
            )
        for image_id, scene in scenes.items():
            assert 3 <= len(scene) <= 6
            for i, a in enumerate(scene):  # non-overlapping (bounding discs) and inside the image
                assert a.extent <= a.x <= STATS.image_size - a.extent
                for b in scene[i + 1 :]:
                    assert ((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5 >= a.extent + b.extent, (
                        image_id
                    )


def test_test_split_is_annotated_held_out_and_rederivable(tmp_path: Path) -> None:
    generate(tmp_path, TINY)
    assert split_layout(tmp_path, "test2015").annotations is not None
    scenes = dict(iter_scenes(tmp_path, "test2015"))
    questions, annotations = load(tmp_path, "test2015")
    assert len(questions) == len(annotations) == 3 * 5
    for q in questions:
        a = annotations[q["question_id"]]
        assert recompute(q["question"], scenes[q["image_id"]]) == a["multiple_choice_answer"]
        assert [h["answer_id"] for h in a["answers"]] == list(range(1, 11))
    held_out = {q["image_id"] for q in questions}
    assert held_out == scenes.keys()
    for split in ("train2014", "val2014"):
        assert not held_out & dict(iter_scenes(tmp_path, split)).keys(), split


# What version 1 wrote for TINY's train/val (scene layouts, questions, the ten human answers
# each): later versions keep those streams, so results on val stay comparable across versions
# (version 2 added test2015 annotations and the question_family field).
V1_CONTENT = {
    "train2014": "7766ab0b7b3f5a698d47c12afce7d56864b354aead41cc42e55558042edbc1ee",
    "val2014": "708214e7adf2481ca95efdebb02848bdf97141c0f4661785b5f1ce06b5ed6dbc",
}


def test_train_and_val_are_those_of_generator_version_1(tmp_path: Path) -> None:
    generate(tmp_path, TINY)
    for split, expected in V1_CONTENT.items():
        questions, annotations = load(tmp_path, split)
        payload = [
            scenes_path(tmp_path, split).read_text(),
            questions,
            [annotations[q["question_id"]]["answers"] for q in questions],
        ]
        assert hashlib.sha256(json.dumps(payload).encode()).hexdigest() == expected, split


def test_family_of_names_the_family_that_wrote_each_question() -> None:
    rng = random.Random(3)
    seen: Counter[str] = Counter()
    for _ in range(60):
        scene = sample_scene(rng, 128)
        for family in FAMILIES:
            for question, _ in family.candidates(scene):
                assert family_of(question) == family.name, question
                seen[family.name] += 1
    assert set(seen) == {f.name for f in FAMILIES}
    for text in ("is there a red circle", "what color is the hexagon?", "how many circles?"):
        with pytest.raises(ValueError, match="not a synthetic shapes question"):
            family_of(text)


def test_answers_are_balanced_within_each_family(stats_root: Path) -> None:
    questions, annotations = load(stats_root, "train2014")
    by_template: dict[str, Counter[str]] = defaultdict(Counter)
    for q in questions:
        # the template: the question with colours, shapes and relations blanked out
        template = re.sub(
            rf"\b({'|'.join(COLORS)}|{'|'.join(SHAPES)})s?\b|left|right", "_", q["question"]
        )
        by_template[template][annotations[q["question_id"]]["multiple_choice_answer"]] += 1
    assert len(by_template) == 7
    for template, counts in by_template.items():
        if set(counts) <= {"yes", "no"}:
            assert abs(counts["yes"] - counts["no"]) <= 1, (template, counts)
        elif template.startswith("how many"):
            common = [counts[n] for n in "012"]
            assert max(common) - min(common) <= 2, (template, counts)
            assert counts["3"] >= 0.4 * max(common), (template, counts)
        else:
            # colours/shapes: uniform up to the few scenes that allow only one answer
            values = list(counts.values())
            assert len(values) in (len(COLORS), len(SHAPES)), (template, counts)
            assert max(values) - min(values) <= 0.25 * sum(values) / len(values), (template, counts)


def test_a_question_only_model_stays_weak(stats_root: Path) -> None:
    # The strongest text-only predictor: the most common train answer of each exact question.
    train_q, train_a = load(stats_root, "train2014")
    val_q, val_a = load(stats_root, "val2014")
    best: dict[str, Counter[str]] = defaultdict(Counter)
    for q in train_q:
        best[q["question"]][train_a[q["question_id"]]["multiple_choice_answer"]] += 1
    scored = Counter()
    for q in val_q:
        a = val_a[q["question_id"]]
        guess = best[q["question"]].most_common(1)[0][0] if best[q["question"]] else "yes"
        scored[a["answer_type"]] += vqa_accuracy(guess, [h["answer"] for h in a["answers"]])
    totals = Counter(val_a[q["question_id"]]["answer_type"] for q in val_q)
    accuracy = {t: scored[t] / totals[t] for t in totals}
    # yes/no: 0.5 by balance plus the soft credit the wrong annotators give the other answer
    assert accuracy["yes/no"] < 0.7 and accuracy["number"] < 0.45 and accuracy["other"] < 0.45, (
        accuracy
    )


def test_annotator_noise_normalises_back_to_the_answer(stats_root: Path) -> None:
    _, annotations = load(stats_root, "train2014")
    variants = wrong = 0
    for a in annotations.values():
        raw = [h["answer"] for h in a["answers"]]
        normalised = Counter(normalize_answer(r) for r in raw)
        (top, top_count), *_ = normalised.most_common()
        assert top == a["multiple_choice_answer"] and top_count >= 7
        assert vqa_accuracy(a["multiple_choice_answer"], raw) == 1.0
        variants += any(r != normalize_answer(r) for r in raw)
        wrong += len(normalised) > 1
    # both kinds of noise are common, so normalisation and soft scores get exercised
    assert 0.3 < variants / len(annotations) < 0.9
    assert 0.3 < wrong / len(annotations) < 0.8


def test_stale_cache_is_detected_and_regenerated(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    assert ensure_generated(root, TINY) is True
    assert ensure_generated(root, TINY) is False
    other = ShapesConfig(**{**TINY.__dict__, "num_val_images": 2})
    assert not is_current(root, other)
    assert ensure_generated(root, other) is True
    assert (
        len(json.loads(split_layout(root, "val2014").questions.read_text())["questions"]) == 2 * 5
    )
    assert is_current(root, other) and not is_current(root, TINY)


def test_never_overwrites_a_folder_that_is_not_a_synthetic_set(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate(tmp_path, TINY)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path / "cli"), "--num-train-images", "2", "--num-val-images", "1",
            "--num-test-images", "1", "--image-size", "40", "--seed", "3"]  # fmt: skip
    main(args)
    assert "train2014" in capsys.readouterr().out
    assert is_current(tmp_path / "cli", ShapesConfig(2, 1, 1, 6, 40, 3))
    main(args)
    assert "up to date" in capsys.readouterr().out


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=16)
    with pytest.raises(ValueError, match="questions_per_image"):
        ShapesConfig(questions_per_image=0)
