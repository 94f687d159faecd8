"""Parameter count and CPU training cost of every fusion block in ``configs/fusion/*.yaml``.

The fusion block is timed alone (forward + backward, train mode) on random encoder features,
so encoder cost does not drown the differences between blocks. Defaults mirror the product
card: ResNet-101 layer3/layer4 (1024/2048 channels, strides 16/32) and BERT-base tokens (768).
Besides the base setting it measures how the cost grows with the grid (last stage 7x7 -> 14x14,
i.e. 224 -> 448 px images) and with the question length (14 -> 28 tokens)::

    python scripts/model_stats.py --repeats 5 --out logs/bench/model_stats.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from vqa.models.fusion.base import FusionBlock
from vqa.utils.project import CONFIG_DIR


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fusions", nargs="*", help="fusion names (default: every yaml)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden-dim", type=int, help="override every block's hidden_dim")
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=[1024, 2048],
        help="visual stage channels, shallow to deep (ResNet-101 layer3 layer4)",
    )
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument(
        "--grid",
        type=int,
        nargs=2,
        default=[7, 14],
        metavar=("BASE", "LARGE"),
        help="last-stage grid side; each shallower stage is twice as fine",
    )
    parser.add_argument(
        "--length",
        type=int,
        nargs=2,
        default=[14, 28],
        metavar=("BASE", "LONG"),
        help="question length in tokens (all real)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is kept")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def build(path: Path, channels: list[int], text_dim: int, hidden_dim: int | None) -> FusionBlock:
    cfg = OmegaConf.load(path)
    if hidden_dim is not None:
        cfg.hidden_dim = hidden_dim
    return instantiate(cfg)(visual_channels=channels, text_dim=text_dim)


def random_batch(
    args: argparse.Namespace, grid: int, length: int
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Encoder-shaped random inputs; they require grad, as when the encoders are fine-tuned."""
    depth = len(args.channels)
    sides = [grid * 2 ** (depth - 1 - i) for i in range(depth)]
    visual = [
        torch.randn(args.batch_size, c, side, side, requires_grad=True)
        for c, side in zip(args.channels, sides, strict=True)
    ]
    text = torch.randn(args.batch_size, length, args.text_dim, requires_grad=True)
    return visual, text, torch.ones(args.batch_size, length, dtype=torch.bool)


def step_ms(
    block: nn.Module, args: argparse.Namespace, settings: list[tuple[int, int]]
) -> list[float]:
    """Median forward + backward wall time per (grid, length) setting.

    Settings are interleaved within every repeat, so load from other processes drifting over
    time hits all of them alike and their ratios stay meaningful.
    """
    batches = [random_batch(args, grid, length) for grid, length in settings]
    samples: list[list[float]] = [[] for _ in settings]
    for repeat in range(args.warmup + args.repeats):
        for batch, sample in zip(batches, samples, strict=True):
            block.zero_grad(set_to_none=True)
            start = time.perf_counter()
            block(*batch).features.sum().backward()
            if repeat >= args.warmup:
                sample.append(1000 * (time.perf_counter() - start))
    return [statistics.median(sample) for sample in samples]


def measure(args: argparse.Namespace) -> list[dict]:
    paths = sorted(CONFIG_DIR.glob("fusion/*.yaml"))
    if args.fusions:
        unknown = set(args.fusions) - {p.stem for p in paths}
        if unknown:
            raise SystemExit(f"unknown fusion(s) {sorted(unknown)}; have {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in args.fusions]
    (grid, large_grid), (length, long_length) = args.grid, args.length
    results = []
    for path in paths:
        torch.manual_seed(0)
        block = build(path, args.channels, args.text_dim, args.hidden_dim).train()
        # base, larger grid, longer question: the order markdown() reads them in
        settings = [(grid, length), (large_grid, length), (grid, long_length)]
        timings = [
            {"grid": g, "length": n, "ms": ms}
            for (g, n), ms in zip(settings, step_ms(block, args, settings), strict=True)
        ]
        results.append(
            {
                "fusion": path.stem,
                "params": sum(p.numel() for p in block.parameters()),
                "out_dim": block.out_dim,
                "timings": timings,
            }
        )
        print(f"measured {path.stem}", file=sys.stderr, flush=True)
    return results


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    (grid, large_grid), (length, long_length) = args.grid, args.length
    lines = [
        f"| fusion | params | out_dim | ms {grid}x{grid}, N={length} "
        f"| ms {large_grid}x{large_grid} (x) | ms N={long_length} (x) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base, wide, long = (t["ms"] for t in r["timings"])
        lines.append(
            f"| {r['fusion']} | {r['params'] / 1e6:.2f}M | {r['out_dim']} | {base:.1f} "
            f"| {wide:.1f} ({wide / base:.2f}x) | {long:.1f} ({long / base:.2f}x) |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure(args)
    print(markdown(results, args))
    if args.out:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        settings |= {"torch": torch.__version__, "threads": torch.get_num_threads()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
