"""What a trained model needs from its data pipeline: the answer vocabulary and the tokenizer.

Two forms of the same content: files beside a run (``answer_vocab.json``, ``tokenizer/``) for
people and tools, and a plain dict of strings for the checkpoint, which must load with
``torch.load(weights_only=True)`` and rebuild the pipeline without the run folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from vqa.data.answers import AnswerVocab
from vqa.data.tokenizer import load_tokenizer

ANSWER_VOCAB_FILE = "answer_vocab.json"
TOKENIZER_DIR = "tokenizer"


def save_artifacts(
    run_dir: str | Path, vocab: AnswerVocab, tokenizer: PreTrainedTokenizerFast
) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(run_dir / ANSWER_VOCAB_FILE)
    tokenizer.save_pretrained(run_dir / TOKENIZER_DIR)


def load_artifacts(run_dir: str | Path) -> tuple[AnswerVocab, PreTrainedTokenizerFast]:
    """The vocabulary and tokenizer written by :func:`save_artifacts`."""
    run_dir = Path(run_dir)
    return AnswerVocab.load(run_dir / ANSWER_VOCAB_FILE), load_tokenizer(
        str(run_dir / TOKENIZER_DIR)
    )


def artifacts_to_dict(vocab: AnswerVocab, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Plain strings and lists only: the tokenizer travels as the text of its saved files."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir())}
    return {
        "answer_vocab": list(vocab.answers),
        "min_answer_count": vocab.min_count,
        "tokenizer_files": files,
    }


def artifacts_from_dict(artifacts: dict[str, Any]) -> tuple[AnswerVocab, PreTrainedTokenizerFast]:
    """Inverse of :func:`artifacts_to_dict` (e.g. from a checkpoint's hyper-parameters)."""
    vocab = AnswerVocab(
        answers=list(artifacts["answer_vocab"]), min_count=artifacts.get("min_answer_count")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in artifacts["tokenizer_files"].items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        tokenizer = load_tokenizer(tmp)
    return vocab, tokenizer
