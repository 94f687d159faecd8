"""scripts/relation_swap.py: both orders of every referent pair, and what a model that ignores
the order (or knows it) scores."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts.relation_swap import main, score, split_pairs
from vqa.data.shapes import ShapesConfig, generate, iter_scenes

QUESTION = re.compile(r"is the (\w+ \w+) (left of|right of) the (\w+ \w+)\?")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("swap") / "shapes"
    generate(root, ShapesConfig(20, 30, 0, questions_per_image=6, image_size=32, seed=4))
    return root


def test_each_pair_is_asked_both_ways_with_opposite_answers(root: Path) -> None:
    pairs = split_pairs(root, "val2014")
    scenes = dict(iter_scenes(root, "val2014"))
    assert len(pairs) > 30
    for pair in pairs:
        (a, rel, b), (b2, rel2, a2) = (QUESTION.fullmatch(q).groups() for q in pair.questions)
        assert (a, b, rel) == (a2, b2, rel2) and a != b
        assert sorted(pair.answers) == ["no", "yes"]
        objects = {f"{o.color} {o.shape}": o for o in scenes[pair.image_id]}
        left = objects[a].x < objects[b].x
        assert pair.answers[0] == ("yes" if left == (rel == "left of") else "no")
    assert {p.questions[0].split()[4] for p in pairs} == {"left", "right"}


def test_an_order_blind_model_keeps_its_answer_a_truthful_one_never(root: Path) -> None:
    pairs = split_pairs(root, "val2014")
    blind = score(pairs, [("yes", "yes")] * len(pairs))
    assert blind.unchanged == 1.0 and blind.accuracy == 0.5
    truthful = score(pairs, [p.answers for p in pairs])
    assert truthful.unchanged == 0.0 and truthful.accuracy == 1.0
    assert truthful.questions == 2 * len(pairs)
    assert all(accuracy == 1.0 for _, accuracy in truthful.by_slice.values())
    counted = sum(n for name, (n, _) in truthful.by_slice.items() if name.startswith("dx"))
    assert counted == truthful.questions


def test_main_asks_the_checkpoint_about_each_scene_image(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model answers through ``Predictor``; here a stand-in that reads the scene (right
    answers for "left of", wrong ones for "right of") and checks each image is the pair's."""
    scenes = dict(iter_scenes(root, "val2014"))

    def answer(image: str, question: str) -> str:
        assert Path(image).is_file()
        image_id = int(Path(image).stem.rsplit("_", 1)[1])
        a, _, b = QUESTION.fullmatch(question).groups()
        objects = {f"{o.color} {o.shape}": o for o in scenes[image_id]}
        return "yes" if objects[a].x < objects[b].x else "no"

    class FakePredictor:
        @classmethod
        def from_checkpoint(cls, path, cache_size):
            assert Path(path).name == "model.ckpt"
            return cls()

        def predict_batch(self, images, questions, top_k):
            return [
                SimpleNamespace(answer=answer(i, q)) for i, q in zip(images, questions, strict=True)
            ]

    monkeypatch.setattr("vqa.inference.Predictor", FakePredictor)
    text = main(["model.ckpt", "--root", str(root), "--split", "val2014", "--batch-size", "7"])
    pairs = split_pairs(root, "val2014")
    right_share = sum(p.questions[0].split()[4] == "left" for p in pairs) / len(pairs)
    assert f"accuracy: {100 * right_share:.1f} %" in text
    assert "answer unchanged when A and B swap: 0.0 % of pairs" in text
