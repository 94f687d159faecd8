"""Validate a data root in the VQA v2 layout: every record and every image.

    python -m vqa.data.check DIR [--splits train2014 val2014] [--workers 8] [--streams left,right]

Prints, per split, the questions, images and answer types found and the problems by reason
(with a few examples), and exits non-zero when anything is wrong. Unlike training, which only
checks records when it loads a split, this decodes every image, so a truncated download is
found before an epoch dies on it.

Several images per question (question records with ``image_ids``, one image id per named
stream): every stream's images are checked, each distinct image once. The streams are those the
split's records name (in order of first appearance), or ``--streams`` (comma-separated, in
order: only those, as ``data.streams`` would read them). A question that lacks one of them is a
problem (``missing_stream``), as it is to the data loader.
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
from vqa.data.vqav2 import load_vqav2_split, read_records


@dataclass
class SplitReport:
    split: str
    questions: int = 0
    images: int = 0  # distinct image files (of every stream)
    answer_types: Counter[str] = field(default_factory=Counter)
    problems: BadRecordLog = field(default_factory=lambda: BadRecordLog("skip", max_examples=50))
    streams: list[str] | None = None  # None: one image per question (image_id)


def record_streams(root: Path, split: str) -> list[str] | None:
    """The stream names of ``split``'s question records' ``image_ids``, in order of first
    appearance (None: no record names any, or the file cannot be read, which loading the
    split then reports)."""
    try:
        records = read_records(split_layout(root, split).questions, "questions")
    except DataError:
        return None
    names: dict[str, None] = {}
    for record in records:
        image_ids = record.get("image_ids") if isinstance(record, dict) else None
        if isinstance(image_ids, dict):
            names.update(dict.fromkeys(str(name) for name in image_ids))
    return list(names) or None


def _decode(path: str) -> DataError | None:
    try:
        load_rgb(path)
    except DataError as err:
        return err
    return None


def check_split(
    root: Path,
    split: str,
    workers: int = 4,
    progress: bool = True,
    streams: Sequence[str] | None = None,
) -> SplitReport:
    """Load ``split`` counting bad records, then decode each distinct image once: of every
    stream in ``streams`` (None: those the records name, if any)."""
    streams = list(streams) if streams is not None else record_streams(root, split)
    report = SplitReport(split, streams=streams)
    try:
        table = load_vqav2_split(root, split, report.problems, streams=streams).table
    except DataError as err:  # a missing or malformed JSON file: nothing else to check
        report.problems.handle(err)
        return report
    report.questions = len(table)
    report.answer_types.update(t for t in column(table, "answer_type") if t)
    paths = set(column(table, "image_path"))
    if streams is not None:
        paths.update(path for row in column(table, "image_paths") for path in row)
    paths = sorted(paths)
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
    for r in reports:
        if r.streams is not None:
            console.print(
                f"{r.split}: streams {', '.join(r.streams)} (images: those of every stream)",
                soft_wrap=True,
                highlight=False,
            )
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


def stream_names(value: str) -> list[str]:
    """``--streams left,right`` -> ["left", "right"]: distinct, non-empty names."""
    names = [name.strip() for name in value.split(",")]
    if not all(names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated stream names, got {value!r}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate a VQA v2-layout data root.")
    parser.add_argument("root", type=Path)
    parser.add_argument(
        "--splits", nargs="+", choices=sorted(SPLITS), help="default: every split present"
    )
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    parser.add_argument(
        "--streams",
        type=stream_names,
        help="comma-separated image_ids streams to check, in order (default: those the "
        "question records name)",
    )
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
        check_split(args.root, s, args.workers, progress=console.is_terminal, streams=args.streams)
        for s in splits
    ]
    render(reports, console)
    return 1 if any(r.problems.total for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
