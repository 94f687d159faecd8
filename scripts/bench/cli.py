"""The driver: command-line arguments, running the chosen sections, writing the report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from scripts import bench
from scripts.bench.common import (
    GPU_ROWS,
    GPU_SIZE_FIELDS,
    ROOT,
    SECTIONS,
    Context,
    compose_config,
    describe,
    fusion_names,
    log,
    machine_busy_seconds,
    make_sizes,
    own_cpu_seconds,
    quieted,
)
from scripts.bench.fusions import section_fusions
from scripts.bench.gpu import section_gpu
from scripts.bench.latency import section_latency
from scripts.bench.ops import section_ops
from scripts.bench.overhead import section_overhead
from scripts.bench.pipeline import section_pipeline
from scripts.bench.report import markdown
from scripts.bench.scaling import section_scaling
from vqa.utils import (
    set_project_root,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=bench.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        help=f"any of {', '.join(SECTIONS)} (or 1-{len(SECTIONS)}); default all",
    )
    parser.add_argument("--fusions", nargs="+", help="fusion names (default: every yaml)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "logs" / "bench",
        help="folder for benchmark.json and benchmark.md",
    )
    parser.add_argument(
        "--repeats", type=int, help="interleaved Lightning/bare pairs (default 5; quick 2)"
    )
    parser.add_argument(
        "--scale-repeats",
        type=int,
        help="timed passes per scaling setting, median kept (default 3; quick 1)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in every process (default 1: on a CPU shared with other "
        "jobs, OpenMP threads waiting on a descheduled peer slow steps by up to 40x; pass the "
        "core count on a quiet machine)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one fresh process per fusion configuration (default: on, off with --quick)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="paths.data_dir (default: the project's data/; with --quick a temporary folder)",
    )
    parser.add_argument(
        "--gpu-smoke",
        action="store_true",
        help="run the gpu section's code on CPU at tiny size when there is no CUDA",
    )
    parser.add_argument("--gpu-fusion", default="parallel")
    parser.add_argument(
        "--gpu-batch-size",
        type=int,
        help="images (one question each) of the optimizer, lightning, anchor and graphs rows "
        "(default 32)",
    )
    parser.add_argument(
        "--gpu-rows",
        nargs="+",
        choices=GPU_ROWS,
        help="rows of the gpu section (default all; graphs runs on a CPU only when named here)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add the graphs row (torch.compile, mode=reduce-overhead), on a CPU too",
    )
    parser.add_argument(
        "--e2e-seconds", type=float, help="training time of the e2e train.py run (default 60)"
    )
    parser.add_argument(
        "--e2e-dir",
        type=Path,
        help="keep the e2e train.py run (its checkpoints/last.ckpt) here instead of a temporary "
        "folder",
    )
    args = parser.parse_args(argv)
    by_number = {str(i + 1): name for i, name in enumerate(SECTIONS)}
    args.sections = [by_number.get(s, s) for s in args.sections]
    if unknown := sorted(set(args.sections) - set(SECTIONS)):
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS} or 1-{len(SECTIONS)}")
    args.gpu_rows_asked = [*(args.gpu_rows or []), *(["graphs"] if args.compile else [])]
    args.gpu_rows = [
        r for r in GPU_ROWS if r in (args.gpu_rows or GPU_ROWS) or r in args.gpu_rows_asked
    ]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the chosen sections, write ``benchmark.json`` / ``benchmark.md``; returns the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with quieted():
        return run(args, argv)


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    set_project_root()
    torch.set_num_threads(args.threads)
    sizes = make_sizes(args.quick)
    smoke_sizes = args.gpu_smoke and not torch.cuda.is_available()
    if smoke_sizes:
        tiny = make_sizes(True)
        for key in GPU_SIZE_FIELDS:
            setattr(sizes, key, getattr(tiny, key))
    if args.gpu_batch_size:
        sizes.gpu_batch = args.gpu_batch_size
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    started = time.perf_counter()
    busy_start, own_start = machine_busy_seconds(), own_cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="vqa-bench-") as tmp:
        workdir = Path(tmp)
        data_dir = args.data_dir or (workdir / "data" if args.quick else None)
        if data_dir is not None:
            sizes.base_overrides.append(f"paths.data_dir={data_dir}")
            sizes.gpu_overrides.append(f"paths.data_dir={data_dir}")
            sizes.e2e_overrides.append(f"paths.data_dir={data_dir}")
            for overrides in sizes.latency_models.values():
                overrides.append(f"paths.data_dir={data_dir}")
        elif smoke_sizes:  # the tiny set must not replace the one in the project's data/
            sizes.e2e_overrides.append(f"paths.data_dir={workdir / 'data'}")
        setup = describe(compose_config(sizes.base_overrides, workdir))
        ctx = Context(
            sizes=sizes,
            fusions=fusion_names(args.fusions),
            device=device,
            threads=args.threads,
            repeats=args.repeats or (2 if args.quick else 5),
            scale_repeats=args.scale_repeats or (1 if args.quick else 3),
            isolate=(not args.quick) if args.isolate is None else args.isolate,
            workdir=workdir,
            default_fusion=setup["fusion"],
            gpu_fusion=args.gpu_fusion,
            gpu_smoke=args.gpu_smoke,
            gpu_rows=args.gpu_rows,
            gpu_rows_asked=args.gpu_rows_asked,
            e2e_seconds=args.e2e_seconds,
            e2e_dir=args.e2e_dir,
        )
        results: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for name in SECTIONS:
            if name not in args.sections:
                continue
            log.info("== %s", name)
            begin = time.perf_counter()
            if name == "fusions":
                results[name] = section_fusions(ctx)
            elif name == "overhead":
                results[name] = section_overhead(ctx)
            elif name == "pipeline":
                rows = results.get("fusions", {}).get("rows")
                results[name] = section_pipeline(ctx, rows)
            elif name == "scaling":
                results[name] = section_scaling(ctx)
            elif name == "gpu":
                results[name] = section_gpu(ctx)
            elif name == "ops":
                results[name] = section_ops(ctx)
            elif name == "latency":
                results[name] = section_latency(ctx)
            timings[name] = time.perf_counter() - begin
        if "fusions" in results:  # the store lived in the temporary folder
            results["fusions"]["feature_store"].pop("feature_dir", None)
    wall = time.perf_counter() - started
    # CPU the rest of the machine used meanwhile: shared-machine figures need it to be read.
    child_runs = [
        *results.get("fusions", {}).get("rows", []),
        *results.get("pipeline", {}).get("model_runs", []),
    ]
    own = own_cpu_seconds() - own_start + sum(r.get("cpu_seconds", 0.0) for r in child_runs)
    busy_end = machine_busy_seconds()
    others = None if busy_start is None or busy_end is None else busy_end - busy_start - own
    report = {
        "meta": {
            "command": shlex.join(
                [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
            ),
            "quick": args.quick,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "device": str(device),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
            "section_seconds": timings,
            "wall_s": wall,
            "quickstart": setup,
            "own_cpu_s": own,
            "other_processes_cpu_s": others,
            "other_processes_cores": None if others is None else max(0.0, others) / wall,
        },
        **results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (args.out / "benchmark.md").write_text(text)
    print(text)
    log.info("wrote %s and %s", args.out / "benchmark.json", args.out / "benchmark.md")
    return report
