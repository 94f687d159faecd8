"""Errors for bad input data and the log of records skipped on purpose.

Every problem names the file, the record (question_id) and the field, so a user with a broken
download of 443k questions can find the one bad line. With ``on_bad_record="skip"`` the same
problems are counted by reason instead of raised: nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Literal

OnBadRecord = Literal["error", "skip"]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad file or record; ``reason`` is a short machine-readable tag used for skip counts."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        question_id: int | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ) -> None:
        where = [str(file)] if file is not None else []
        if question_id is not None:
            where.append(f"question_id={question_id}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(": ".join([*where, message]))
        self.file = None if file is None else Path(file)
        self.question_id = question_id
        self.field = field
        self.reason = reason


class BadRecordLog:
    """Applies the ``on_bad_record`` policy: raise the first problem, or count and keep going."""

    def __init__(self, on_bad_record: OnBadRecord = "error", max_examples: int = 5) -> None:
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.on_bad_record = on_bad_record
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []
        self.max_examples = max_examples

    def handle(self, error: DataError) -> None:
        """Raise ``error`` in "error" mode; otherwise record it (the caller drops the record)."""
        if self.on_bad_record == "error":
            raise error
        self.counts[error.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reasons(self) -> str:
        """Counts by reason, e.g. ``missing_image=2, empty_question=1``."""
        return ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))

    def report(self, what: str) -> None:
        """Log the skip counts and a few examples as a warning (a no-op when nothing was bad)."""
        if self.total:
            examples = "".join(f"\n  e.g. {example}" for example in self.examples)
            log.warning("%s: %d skipped (%s)%s", what, self.total, self.reasons(), examples)
