"""Question tokenisers: a pretrained BERT tokenizer by name or path, or one built from the data.

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
from collections.abc import Iterable
from pathlib import Path

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
