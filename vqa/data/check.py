"""Validate a data root in the VQA v2 layout: every record and every image.

    python -m vqa.data.check DIR [--splits train2014 val2014] [--workers 8]

Prints, per split, the questions, images and answer types found and the problems by reason
(with a few examples), and exits non-zero when anything is wrong. Unlike training, which only
checks records when it loads a split, this decodes every image, so a truncated download is
found before an epoch dies on it.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from vqa.data.errors import BadRecordLog, DataError
from vqa.data.images import load_rgb
from vqa.data.layout import SPLITS, split_layout
from vqa.data.table import column
from vqa.data.vqav2 import load_vqav2_split


@dataclass
class SplitReport:
    split: str
    questions: int = 0
    images: int = 0
    answer_types: Counter[str] = field(default_factory=Counter)
    problems: BadRecordLog = field(default_factory=lambda: BadRecordLog("skip", max_examples=50))


def _decode(path: str) -> DataError | None:
    try:
        load_rgb(path)
    except DataError as err:
        return err
    return None


def check_split(root: Path, split: str, workers: int = 4, progress: bool = True) -> SplitReport:
    """Load ``split`` counting bad records, then decode each distinct image once."""
    report = SplitReport(split)
    try:
        table = load_vqav2_split(root, split, report.problems).table
    except DataError as err:  # a missing or malformed JSON file: nothing else to check
        report.problems.handle(err)
        return report
    report.questions = len(table)
    report.answer_types.update(t for t in column(table, "answer_type") if t)
    paths = sorted(set(column(table, "image_path")))
    report.images = len(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without holding the GIL
        results = pool.map(_decode, paths)
        for error in track(
            results, total=len(paths), description=f"{split} images", disable=not progress
        ):
            if error is not None:
                report.problems.handle(error)
    return report


def render(reports: Sequence[SplitReport], console: Console) -> None:
    table = Table(title="VQA data check")
    for heading in ("split", "questions", "images", "yes/no", "number", "other", "problems"):
        table.add_column(heading, justify="left" if heading == "split" else "right")
    for r in reports:
        table.add_row(
            r.split,
            str(r.questions),
            str(r.images),
            *(str(r.answer_types[t]) for t in ("yes/no", "number", "other")),
            str(r.problems.total) if r.problems.total else "none",
        )
    console.print(table)
    # soft_wrap: file paths stay on one line, whole, so they can be copied
    for r in reports:
        if r.problems.total:
            console.print(
                f"{r.split}: {r.problems.total} problems ({r.problems.reasons()})",
                soft_wrap=True,
                highlight=False,
            )
            for example in r.problems.examples:
                console.print(f"  {example}", soft_wrap=True, highlight=False, markup=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate a VQA v2-layout data root.")
    parser.add_argument("root", type=Path)
    parser.add_argument(
        "--splits", nargs="+", choices=sorted(SPLITS), help="default: every split present"
    )
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    args = parser.parse_args(argv)
    # Problems are reported in the summary below, not also as loader warnings.
    logging.getLogger("vqa.data").setLevel(logging.ERROR)
    console = Console()
    splits = args.splits or [s for s in SPLITS if split_layout(args.root, s).questions.is_file()]
    if not splits:
        console.print(
            f"no question files under {args.root}/Questions: not a VQA v2 layout", soft_wrap=True
        )
        return 2
    reports = [
        check_split(args.root, s, args.workers, progress=console.is_terminal) for s in splits
    ]
    render(reports, console)
    return 1 if any(r.problems.total for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
