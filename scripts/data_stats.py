"""Figures of the default synthetic set: generation time and size, a question-only baseline,
and data-loader throughput (questions/s) with the default transforms.

    python scripts/data_stats.py [--root DIR] [--workers 0 2] [--batches 40]
                                 [--questions-per-image N]

The baseline predicts, for each question_type, the most common training answer and is scored
with the official VQA accuracy on val2014: the floor a model that looks at the image must beat.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from vqa.data.answers import vqa_accuracy
from vqa.data.shapes import ShapesConfig, generate
from vqa.data.table import column
from vqa.data.vqav2 import load_vqav2_split

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "shapes.yaml"


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes of file content, bytes of allocated blocks) under ``root``."""
    files = [p.stat() for p in root.rglob("*") if p.is_file()]
    return sum(s.st_size for s in files), sum(s.st_blocks * 512 for s in files)


def question_type_baseline(root: Path) -> dict[str, float]:
    """Official accuracy per answer type (and overall) of the per-question_type majority answer."""
    train, val = load_vqav2_split(root, "train2014").table, load_vqav2_split(root, "val2014").table
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    for qtype, answer in zip(
        column(train, "question_type"), column(train, "multiple_choice_answer"), strict=True
    ):
        by_type[qtype][answer] += 1
    fallback = Counter(column(train, "multiple_choice_answer")).most_common(1)[0][0]
    scores: dict[str, list[float]] = defaultdict(list)
    for qtype, atype, answers in zip(
        column(val, "question_type"),
        column(val, "answer_type"),
        column(val, "answers"),
        strict=True,
    ):
        guess = by_type[qtype].most_common(1)[0][0] if by_type[qtype] else fallback
        scores[atype].append(vqa_accuracy(guess, answers))
    result = {atype: sum(s) / len(s) for atype, s in sorted(scores.items())}
    result["overall"] = sum(sum(s) for s in scores.values()) / sum(len(s) for s in scores.values())
    return result


def loader_throughput(root: Path, config: ShapesConfig, num_workers: int, batches: int) -> float:
    """Training questions per second through the default data config (decode, resize, normalise,
    tokens, targets, collate) on the set ``config`` generated, after one warm-up batch."""
    data = OmegaConf.load(CONFIG)
    data.source = OmegaConf.merge(data.source, dataclasses.asdict(config))
    cfg = OmegaConf.create(
        {
            "paths": {"data_dir": str(root.parent)},
            "seed": 0,
            "model": {"text": {"name_or_path": None}},
            "data": data,
        }
    )
    dm = instantiate(cfg.data, root=str(root), cache_dir=None, num_workers=num_workers)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)
    start, questions = time.perf_counter(), 0
    for _ in range(batches):
        questions += next(loader).num_real_questions
    return questions / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="where to generate (default: a temporary folder)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=40, help="timed batches per worker setting")
    parser.add_argument(
        "--questions-per-image",
        type=int,
        default=ShapesConfig.questions_per_image,
        help="of the generated set (VQA v2 averages 5.4); the loader decodes once per image",
    )
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "shapes"
        # The defaults, as in configs/data/shapes.yaml, unless told otherwise.
        config = ShapesConfig(questions_per_image=args.questions_per_image)
        start = time.perf_counter()
        manifest = generate(root, config)
        seconds = time.perf_counter() - start
        content, allocated = disk_usage(root)
        questions = {split: s["questions"] for split, s in manifest["splits"].items()}
        console.print(
            f"generated {config} in {seconds:.1f} s: {questions} questions, "
            f"{content / 2**20:.1f} MiB of files ({allocated / 2**20:.1f} MiB on disk)"
        )

        table = Table(title="question-type majority baseline, val2014 (official accuracy)")
        baseline = question_type_baseline(root)
        for name in baseline:
            table.add_column(name, justify="right")
        table.add_row(*(f"{100 * v:.1f}" for v in baseline.values()))
        console.print(table)

        for workers in args.workers:
            rate = loader_throughput(root, config, workers, args.batches)
            console.print(f"train loader, num_workers={workers}: {rate:.0f} questions/s")


if __name__ == "__main__":
    main()
