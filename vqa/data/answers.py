"""Answer processing that reproduces the official VQA evaluation, plus the answer vocabulary.

The normalisation tables and rules are those of ``vqaEval.py`` from GT-Vision-Lab/VQA (the
version the EvalAI server runs), reproduced with their odd corners on purpose: a model is only
comparable with published numbers if it is scored by exactly the same string rules.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# `(?!<=\d)` is a typo for a look-behind in the original; as written it is a look-ahead that
# can never fail at a '.', so the rule really is "drop a period not followed by a digit".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# The official code calls `periodStrip.sub("", text, re.UNICODE)`: the flag lands in the `count`
# argument, so at most int(re.UNICODE) == 32 periods are removed per string.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

# Leave-one-out accuracy by number of matching human answers (out of ten):
# mean over the ten 9-answer subsets of min(1, matches_in_subset / 3).
SCORE_TABLE: tuple[float, ...] = (0.0, 0.3, 0.6, 0.9, 1.0)


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or space out punctuation, then strip periods."""
    # Every decision looks at the *input* text, not the progressively edited output.
    has_digit_comma = COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCT:
        if has_digit_comma or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words to digits, drop articles,
    restore apostrophes of common contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(answer: str) -> str:
    """The official evaluator's first step on both sides: tabs/newlines to spaces, strip."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """Full official normalisation of one answer string.

    Cached: human answers repeat heavily ("yes", "2", ...), and this runs for every one of the
    ten answers of every question when building targets.
    """
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


def answer_score(matches: int) -> float:
    """Soft score of an answer given by ``matches`` of the ten annotators."""
    if matches < 0:
        raise ValueError(f"matches must be >= 0, got {matches}")
    return SCORE_TABLE[min(matches, len(SCORE_TABLE) - 1)]


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official per-question accuracy in [0, 1].

    Mirrors ``VQAEval.evaluate``: both sides are whitespace-cleaned, but normalised only when the
    human answers are not all identical (so ten "Yes." and a predicted "yes" score 0). The value
    is the mean over leave-one-out subsets of min(1, matches / 3), summed in the same order as
    the official code so results agree bit for bit.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    gts = [_clean_whitespace(a) for a in human_answers]
    pred = _clean_whitespace(prediction)
    if len(set(gts)) > 1:
        # normalize_answer re-cleans whitespace, a no-op here, and is cached.
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = sum(a == pred for a in gts)
    # Leaving annotator i out removes one match exactly when annotator i agreed.
    subset_acc = [min(1.0, (matches - (a == pred)) / 3) for a in gts]
    return sum(subset_acc) / len(subset_acc)


@dataclass
class AnswerVocab:
    """Ordered answer list (normalised strings) with an answer -> class id index."""

    answers: list[str]
    min_count: int | None = None
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.index = {a: i for i, a in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            dupes = sorted(a for a, n in Counter(self.answers).items() if n > 1)
            raise ValueError(f"answer vocabulary has duplicate answers: {dupes[:10]}")

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return answer in self.index

    def encode(self, answer: str) -> int | None:
        """Class id of an already-normalised answer, or None when out of vocabulary."""
        return self.index.get(answer)

    def decode(self, idx: int) -> str:
        """Answer string of a class id."""
        if not 0 <= idx < len(self.answers):
            raise IndexError(f"answer id {idx} out of range for a vocabulary of {len(self)}")
        return self.answers[idx]

    @classmethod
    def build(cls, multiple_choice_answers: Iterable[str], min_count: int = 9) -> AnswerVocab:
        """Vocabulary of normalised answers that answer at least ``min_count`` questions.

        Sorted by count (descending) then alphabetically, so the class ids are reproducible
        across runs and machines; on VQA v2 train+val with ``min_count=9`` this gives 3129.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(normalize_answer(a) for a in multiple_choice_answers)
        kept = [(a, n) for a, n in counts.items() if n >= min_count]
        kept.sort(key=lambda item: (-item[1], item[0]))
        return cls(answers=[a for a, _ in kept], min_count=min_count)

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON beside a run, so checkpoints decode the same ids."""
        payload = {"answers": self.answers, "min_count": self.min_count}
        Path(path).write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> AnswerVocab:
        """Read a vocabulary written by :meth:`save`; errors name the file."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        answers = payload.get("answers") if isinstance(payload, dict) else None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}: expected an object with an 'answers' list of strings")
        try:
            return cls(answers=answers, min_count=payload.get("min_count"))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def soft_scores(human_answers: Sequence[str], vocab: AnswerVocab) -> dict[int, float]:
    """Soft targets {class id: score} from the normalised human answers.

    Answers outside the vocabulary are dropped; such questions simply get a lower target mass.
    """
    counts = Counter(normalize_answer(a) for a in human_answers)
    scores: dict[int, float] = {}
    for answer, n in counts.items():
        idx = vocab.encode(answer)
        if idx is not None:
            scores[idx] = answer_score(n)
    return scores


def soft_target_tensor(human_answers: Sequence[str], vocab: AnswerVocab) -> torch.Tensor:
    """Dense float target of shape [len(vocab)] for BCE-with-logits training."""
    target = torch.zeros(len(vocab), dtype=torch.float32)
    scores = soft_scores(human_answers, vocab)
    if scores:
        target[list(scores)] = torch.tensor(list(scores.values()), dtype=torch.float32)
    return target
