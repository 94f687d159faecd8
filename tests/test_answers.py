"""Official VQA answer normalisation, per-question accuracy, vocabulary and soft targets."""

from __future__ import annotations

import json
import random
import re
from itertools import combinations

import pytest
import torch

from vqa.data.answers import (
    PUNCT,
    SCORE_TABLE,
    AnswerVocab,
    answer_score,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    soft_scores,
    soft_target_tensor,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------
# A deliberately literal restatement of the official loops (same call forms, no shortcuts), used
# as an oracle for the optimised implementation on random strings.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA = re.compile(r"(\d)(\,)(\d)")


def _literal_process_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(_COMMA, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    # The official call passes re.UNICODE positionally, i.e. as `count`.
    return _PERIOD.sub("", out_text, re.UNICODE)


def _literal_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Official loop over answer dicts: leave-one-out by dict inequality (ids make them unique)."""
    gts = [{"answer": a.replace("\n", " ").replace("\t", " ").strip(), "answer_id": i + 1}
           for i, a in enumerate(human_answers)]  # fmt: skip
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = process_digit_article(_literal_process_punctuation(g["answer"]))
        res = process_digit_article(_literal_process_punctuation(res))
    accs = []
    for held_out in gts:
        others = [g for g in gts if g != held_out]
        accs.append(min(1, float(len([g for g in others if g["answer"] == res])) / 3))
    return float(sum(accs)) / len(accs)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "Yes"),  # no lower-casing here: that is processDigitArticle's job
        ("1,000", "1000"),  # digit-comma-digit: every punctuation mark is deleted
        ("1, 000", "1 000"),  # ", " present: comma deleted, not spaced
        ("red,blue", "red blue"),  # no adjacent space: comma becomes a space
        ("red, blue", "red blue"),
        ("x-ray", "x ray"),
        ("hi (there)", "hi there "),  # " (" seen -> "(" deleted; ") " not seen -> ")" spaced
        ("1,000 (approx)!", "1000 approx"),  # the digit comma decides for every mark
        ("what?!", "what  "),
        ("3.5", "3.5"),  # a period before a digit survives
        (".5", ".5"),
        ("5.", "5"),
        ("a.b.c", "abc"),  # inner periods are deleted, not spaced
        ("3:00", "3:00"),  # ':' is not in the official list
        ("don't", "don't"),  # neither is the apostrophe
        ("#1 & $2", "#1 & $2"),
        ("a/b", "a b"),
        ("a\\b", "a b"),
    ],
)
def test_process_punctuation(text: str, expected: str) -> None:
    assert process_punctuation(text) == expected


def test_period_strip_removes_at_most_32_periods() -> None:
    # re.UNICODE (== 32) lands in re.sub's `count` argument in the official code.
    assert process_punctuation("." * 40) == "." * 8
    assert process_punctuation("." * 32) == ""
    assert process_punctuation("x." * 33) == "x" * 33 + "."
    assert normalize_answer("x." * 33) == "x" * 33 + "."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("The two cats", "2 cats"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the number map stops at ten
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("Im", "im"),  # capitalised table keys can never match after lower-casing
        ("  many   spaces  ", "many spaces"),
        ("the", ""),
    ],
)
def test_process_digit_article(text: str, expected: str) -> None:
    assert process_digit_article(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("two", "2"),
        ("Two!", "2"),
        ("1,000", "1000"),
        ("1, 000", "1 000"),
        ("a dog", "dog"),
        ("dont", "don't"),
        ("\tYes.\n", "yes"),
        ("red\tcar", "red car"),
        ("What's up?", "what's up"),
        ("A red, white and blue flag.", "red white and blue flag"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_process_punctuation_matches_literal_official_loop() -> None:
    rng = random.Random(0)
    alphabet = list(PUNCT) + list("..  ab19':#")
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert process_punctuation(text) == _literal_process_punctuation(text), repr(text)


# ---------------------------------------------------------------------------------------------
def test_score_table_is_the_leave_one_out_mean() -> None:
    for matches in range(11):
        subsets = combinations([1] * matches + [0] * (10 - matches), 9)
        expected = sum(min(1, sum(s) / 3) for s in subsets) / 10
        assert answer_score(matches) == pytest.approx(expected, abs=1e-12)
    assert SCORE_TABLE == (0.0, 0.3, 0.6, 0.9, 1.0)
    with pytest.raises(ValueError):
        answer_score(-1)


@pytest.mark.parametrize("matches", range(11))
def test_vqa_accuracy_by_match_count(matches: int) -> None:
    humans = ["cat"] * matches + ["dog", "cow"] * 5
    humans = humans[:10]
    assert vqa_accuracy("cat", humans) == pytest.approx(answer_score(matches), abs=1e-12)


def test_vqa_accuracy_normalises_both_sides() -> None:
    humans = ["Two", "2", "two.", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("TWO!", humans) == pytest.approx(0.9)
    assert vqa_accuracy("2", humans) == pytest.approx(0.9)
    assert vqa_accuracy("three", humans) == pytest.approx(1.0)
    assert vqa_accuracy("Yes.", ["yes"] * 9 + ["no"]) == pytest.approx(1.0)


def test_vqa_accuracy_all_identical_answers_skip_normalisation() -> None:
    assert vqa_accuracy("yes", ["Yes."] * 10) == 0.0
    assert vqa_accuracy("Yes.", ["Yes."] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # case-sensitive when not normalised
    # Whitespace cleaning still happens on both sides, and before the all-identical test.
    assert vqa_accuracy(" Yes.\n", ["Yes."] * 9 + ["\tYes. "]) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["yes "]) == 0.0
    # One differing answer switches normalisation on for everyone.
    assert vqa_accuracy("yes", ["Yes."] * 9 + ["Yes"]) == 1.0


def test_vqa_accuracy_matches_literal_official_loop() -> None:
    rng = random.Random(1)
    pool = ["yes", "Yes.", "no", "two", "2", "2.", "Red!", "red", "a dog", "dog", "1,000", "1000"]
    for _ in range(500):
        n = rng.choice([10, 10, 10, 3, 1])
        humans = [rng.choice(pool[: rng.randint(2, len(pool))]) for _ in range(n)]
        pred = rng.choice(pool)
        assert vqa_accuracy(pred, humans) == _literal_accuracy(pred, humans), (pred, humans)


def test_vqa_accuracy_rejects_empty_answers() -> None:
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# ---------------------------------------------------------------------------------------------
def _mc_answers() -> list[str]:
    return (
        ["yes"] * 4 + ["Yes."]  # 5 x "yes"
        + ["no"] * 5
        + ["2"] * 3 + ["two", "Two"]  # 5 x "2"
        + ["red"] * 2
        + ["blue", "Blue!"]
        + ["cat"]
    )  # fmt: skip


def test_vocab_build_orders_by_count_then_alphabet() -> None:
    vocab = AnswerVocab.build(_mc_answers(), min_count=2)
    assert vocab.answers == ["2", "no", "yes", "blue", "red"]
    assert vocab.min_count == 2
    assert AnswerVocab.build(_mc_answers(), min_count=1).answers[-1] == "cat"
    assert AnswerVocab.build(_mc_answers(), min_count=6).answers == []
    assert AnswerVocab.build(reversed(_mc_answers()), min_count=2) == vocab
    with pytest.raises(ValueError):
        AnswerVocab.build(_mc_answers(), min_count=0)


def test_vocab_lookup() -> None:
    vocab = AnswerVocab(["yes", "no", "2"])
    assert len(vocab) == 3
    assert "no" in vocab and "maybe" not in vocab
    assert vocab.encode("2") == 2 and vocab.encode("two") is None
    assert [vocab.decode(vocab.encode(a)) for a in vocab.answers] == vocab.answers
    for bad in (3, -1):
        with pytest.raises(IndexError):
            vocab.decode(bad)
    with pytest.raises(ValueError, match="duplicate"):
        AnswerVocab(["yes", "no", "yes"])


def test_vocab_save_load_roundtrip(tmp_path) -> None:
    vocab = AnswerVocab.build(_mc_answers(), min_count=2)
    path = tmp_path / "answers.json"
    vocab.save(path)
    payload = json.loads(path.read_text())
    assert payload == {"answers": ["2", "no", "yes", "blue", "red"], "min_count": 2}
    loaded = AnswerVocab.load(path)
    assert loaded == vocab and loaded.index == vocab.index


@pytest.mark.parametrize("content", ["{not json", '{"answers": "yes"}', '["yes"]'])
def test_vocab_load_errors_name_the_file(tmp_path, content: str) -> None:
    path = tmp_path / "broken_vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"broken_vocab\.json"):
        AnswerVocab.load(path)


# ---------------------------------------------------------------------------------------------
def test_soft_scores() -> None:
    vocab = AnswerVocab(["yes", "no", "2"])
    humans = ["yes"] * 3 + ["Yes."] + ["no"] * 2 + ["maybe"] * 3 + ["two"]
    scores = soft_scores(humans, vocab)
    assert scores.keys() == {0, 1, 2}  # "maybe" is out of vocabulary
    assert scores[0] == 1.0 and scores[1] == pytest.approx(0.6) and scores[2] == pytest.approx(0.3)
    target = soft_target_tensor(humans, vocab)
    assert target.dtype == torch.float32 and target.shape == (3,)
    torch.testing.assert_close(target, torch.tensor([1.0, 0.6, 0.3]))
    assert soft_target_tensor(["maybe"] * 10, vocab).abs().sum() == 0


def test_soft_target_equals_accuracy_of_predicting_that_answer() -> None:
    # The training target of a class is exactly the official score a model would get for it.
    rng = random.Random(2)
    pool = ["yes", "Yes.", "no", "two", "2", "Red!", "red", "blue", "a dog", "dog"]
    vocab = AnswerVocab(["yes", "no", "2", "red", "blue", "dog"])
    for _ in range(200):
        humans = [rng.choice(pool) for _ in range(10)]
        if len(set(humans)) == 1:
            continue
        target = soft_target_tensor(humans, vocab)
        expected = torch.tensor([vqa_accuracy(a, humans) for a in vocab.answers])
        torch.testing.assert_close(target, expected, check_dtype=False, atol=1e-6, rtol=0)
