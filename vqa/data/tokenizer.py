"""Question tokenisers: a pretrained BERT tokenizer by name or path, or one built from the data.

Which one a run uses is decided in one place, :func:`tokenizer_spec`: the text encoder's own
``name_or_path`` (``configs/model/text/*.yaml``), so token ids are those its embedding expects.
Training hands that choice to the datamodule, which builds the tokenizer at ``setup``;
evaluation, prediction and export take the tokenizer a checkpoint carries instead.

The built one is the offline default of the synthetic set (paired with a small randomly
initialised BERT): a BERT WordPiece model (uncased, [PAD]/[UNK]/[CLS]/[SEP]/[MASK]) whose
vocabulary is every training word plus single-character pieces, so an unseen word is spelled
out instead of becoming [UNK]. The vocabulary is counted here rather than trained with
``tokenizers``' WordPieceTrainer because that trainer breaks ties in hash-map order: two runs
on the same questions give different vocabularies, and a run must be reproducible.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerFast

from vqa.data.hub_access import check_hub_reachable, hub_offline, hub_unavailable

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Pieces always present, so digits, letters and punctuation never map to [UNK].
BASE_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation


def build_vocab(texts: Iterable[str], min_frequency: int = 1) -> dict[str, int]:
    """Deterministic WordPiece vocabulary: specials, characters (+ ``##`` pieces), then words
    with at least ``min_frequency`` occurrences by count, ties alphabetical."""
    # The BERT pipeline's own normaliser and pre-tokeniser decide what a "word" is.
    pipeline = BertTokenizer().backend_tokenizer
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = pipeline.normalizer.normalize_str(text)
        counts.update(word for word, _ in pipeline.pre_tokenizer.pre_tokenize_str(normalized))
    words = sorted(
        (w for w, n in counts.items() if n >= min_frequency), key=lambda w: (-counts[w], w)
    )
    characters = sorted(set(BASE_CHARACTERS).union(*words))
    tokens = [*SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters), *words]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def load_tokenizer(
    name_or_path: str | None,
    texts: Iterable[str] | None = None,
    save_dir: str | Path | None = None,
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """A fast BERT-style tokenizer.

    ``name_or_path``: a local folder (e.g. a run's saved tokenizer) or a hub name, used from the
    cache when present; a cold cache offline fails at once with what to do. ``None``: build the
    vocabulary from ``texts`` (the training questions). Saved to ``save_dir`` when given.
    """
    if name_or_path is None:
        if texts is None:
            raise ValueError(
                "load_tokenizer(None, ...) builds a vocabulary and needs the training questions as texts"
            )
        tokenizer = BertTokenizer(vocab=build_vocab(texts, min_frequency))
    elif Path(name_or_path).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        except OSError as err:
            what = f"tokenizer {name_or_path!r}"
            if hub_offline():
                raise hub_unavailable(what) from err
            check_hub_reachable(what)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{name_or_path!r} has no fast (tokenizers-backed) tokenizer")
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer to build: a pretrained one (hub name or local folder), or with
    ``name_or_path=None`` a WordPiece vocabulary built from the training questions."""

    name_or_path: str | None = None
    min_frequency: int = 1

    @property
    def built_from_questions(self) -> bool:
        return self.name_or_path is None

    def load(
        self,
        training_questions: Callable[[], Iterable[str]] | None = None,
        save_dir: str | Path | None = None,
    ) -> PreTrainedTokenizerFast:
        """The tokenizer; ``training_questions`` is called only when the vocabulary is built
        from them, so a pretrained tokenizer never loads the training split for nothing."""
        texts = None
        if self.built_from_questions and training_questions is not None:
            texts = training_questions()
        return load_tokenizer(self.name_or_path, texts, save_dir, self.min_frequency)


def tokenizer_spec(text_config: Mapping[str, Any] | None) -> TokenizerSpec:
    """The one rule for a run's tokenizer: the text encoder config's ``name_or_path`` (null: a
    WordPiece vocabulary built from the training questions). ``model.text.name_or_path=...``
    therefore changes the encoder and its tokenizer together."""
    name_or_path = None if text_config is None else text_config.get("name_or_path")
    return TokenizerSpec(None if name_or_path is None else str(name_or_path))
