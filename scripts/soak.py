"""Soak run (`make soak ARGS=...`): train the quick-start for a wall time and watch memory and step
time, to see leaks and slow-downs that a few epochs hide.

    python scripts/soak.py --minutes 20                    # the quick-start, one row a minute
    python scripts/soak.py --minutes 5 fusion=parallel     # extra arguments are Hydra overrides
    python scripts/soak.py --tiny --minutes 0.2 --interval-seconds 1 --warmup-minutes 0.05

Like `make train`, it first builds (or finds complete) the quick-start's feature cache, then
fits in this process with `trainer.max_time` set to ``--minutes`` and `trainer.max_epochs`
large, so epochs repeat until the time is up. The LR schedule spans that epoch budget, so it
stays near its start: neither memory nor step time depends on the learning rate. There is no
test stage and no progress bar (it would break the table).

Every ``--interval-seconds`` (default 60) a row gives the RSS of this process, of this process
plus its children (data-loader workers; shared pages count once per process), their PSS where
psutil can read it, and the mean training-step time (``training_step`` to ``on_train_batch_end``:
no data wait, no validation) of the steps in that interval. Rows print as a markdown table and go
to ``<out>/soak.json`` and ``<out>/soak.md`` (default ``logs/soak/<time>``; the run's own files
under ``<out>/run``), rewritten every row so an interrupted soak keeps what it measured.

At the end it reports whether RSS stayed flat: every row after ``--warmup-minutes`` (default 3)
within ``--tolerance`` (default 5 %) of the first such row. Reported only, never an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `scripts.bench` when run as `python scripts/soak.py`
    sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from scripts.bench.common import (  # noqa: E402
    TINY,
    compose_config,
    describe,
    machine_busy_seconds,
    own_cpu_seconds,
    quieted,
    rss_mib,
)
from scripts.bench.report import _f, _table  # noqa: E402
from vqa.cli.train import build_feature_stores, train  # noqa: E402
from vqa.utils import apply_extras, set_project_root  # noqa: E402

try:
    import psutil
except ImportError:  # the /proc readers below stand in
    psutil = None

log = logging.getLogger("soak")

# The quick-start exactly as `make train` runs it (features from the cache), unlike the
# benchmark's base, which trains its encoder from images.
SOAK_BASE = ["experiment=quickstart"]
SOAK_OVERRIDES = [
    "test=false",
    "trainer.min_epochs=null",  # max_time may end the fit inside the first epoch
    "trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
]
COLUMNS = (
    ("t (min)", "r"),
    ("epoch", "r"),
    ("steps", "r"),
    ("ms/step", "r"),
    ("main RSS MiB", "r"),
    ("main+workers RSS MiB", "r"),
    ("workers", "r"),
    ("main+workers PSS MiB", "r"),
)


# ------------------------------------------------------------------------------- memory


def _proc_children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *_proc_children(kid)]
    return found


def memory_sample() -> dict[str, Any]:
    """RSS of this process, and of it plus its descendants (loader workers), in MiB; PSS too,
    which counts shared pages once, where psutil can read it."""
    if psutil is None:
        children = _proc_children(os.getpid())
        main = rss_mib()
        total = main
        for pid in children:
            try:
                total += rss_mib(pid)
            except OSError:  # exited meanwhile
                continue
        return {
            "rss_main_mib": main,
            "rss_total_mib": total,
            "pss_total_mib": None,
            "workers": len(children),
        }
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    rss: list[int] = []
    pss: list[int] | None = []
    for p in procs:
        try:
            rss.append(p.memory_info().rss)
            if pss is not None:
                pss.append(p.memory_full_info().pss)
        except psutil.NoSuchProcess:
            continue
        except (psutil.AccessDenied, AttributeError):
            pss = None
    return {
        "rss_main_mib": rss[0] / 2**20,
        "rss_total_mib": sum(rss) / 2**20,
        "pss_total_mib": None if pss is None else sum(pss) / 2**20,
        "workers": len(procs) - 1,
    }


# ------------------------------------------------------------------------------- monitor


class SoakMonitor(pl.Callback):
    """Times training steps and, from a thread (a stalled step still gets its row), samples
    memory every ``interval_s`` seconds of the fit, handing each row to ``on_row``."""

    def __init__(self, interval_s: float, on_row: Callable[[dict[str, Any]], None]) -> None:
        self.interval_s = interval_s
        self.on_row = on_row
        self.rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._durations: list[float] = []
        self._step_start: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trainer: pl.Trainer | None = None
        self._started = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._started = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_loop, name="soak", daemon=True)
        self._thread.start()

    def on_train_batch_start(self, *args: Any) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        if self._step_start is not None:
            took = time.perf_counter() - self._step_start
            with self._lock:
                self._durations.append(took)
            self._step_start = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _sample_loop(self) -> None:
        due = self._started + self.interval_s
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            try:
                self._sample(time.monotonic() - self._started)
            except Exception:  # a report that fails to write must not end the soak
                log.exception("soak sample failed")
            due += self.interval_s

    def _sample(self, elapsed: float) -> None:
        with self._lock:
            durations, self._durations = self._durations, []
        trainer = self._trainer
        row = {
            "t_s": elapsed,
            "epoch": None if trainer is None else trainer.current_epoch,
            "global_step": None if trainer is None else trainer.global_step,
            "steps": len(durations),
            "step_ms": statistics.fmean(durations) * 1e3 if durations else None,
            **memory_sample(),
        }
        self.rows.append(row)
        self.on_row(row)


# The soak's own instance reaches vqa.cli.train through the callbacks config (`_target_` below), so
# the fit runs exactly as train.py's, with no second code path.
_ACTIVE: SoakMonitor | None = None


def active_monitor() -> SoakMonitor:
    if _ACTIVE is None:
        raise RuntimeError("scripts/soak.py sets the monitor before training")
    return _ACTIVE


# ------------------------------------------------------------------------------- verdict


def flatness(rows: Sequence[dict[str, Any]], warmup_s: float, tolerance: float) -> dict[str, Any]:
    """Whether RSS stayed within ``tolerance`` of its value at the end of the warm-up: per
    measure, the largest relative distance of a later row from the first one after warm-up,
    and the least-squares slope, for telling a leak from a plateau."""
    after = [r for r in rows if r["t_s"] >= warmup_s]
    verdict: dict[str, Any] = {"warmup_s": warmup_s, "tolerance": tolerance, "rows": len(after)}
    if len(after) < 2:
        verdict["flat"] = None
        verdict["note"] = "fewer than two rows after the warm-up: run longer"
        return verdict
    for key in ("rss_main_mib", "rss_total_mib"):
        values = [r[key] for r in after]
        base = values[0]
        minutes = [r["t_s"] / 60 for r in after]
        verdict[key] = {
            "baseline_mib": base,
            "min_mib": min(values),
            "max_mib": max(values),
            "end_mib": values[-1],
            "max_drift": max(abs(v - base) for v in values) / base,
            "slope_mib_per_min": statistics.linear_regression(minutes, values).slope,
        }
        verdict[key]["flat"] = verdict[key]["max_drift"] <= tolerance
    verdict["flat"] = all(verdict[k]["flat"] for k in ("rss_main_mib", "rss_total_mib"))
    return verdict


def verdict_text(verdict: dict[str, Any]) -> str:
    head = (
        f"RSS flat within {verdict['tolerance']:.0%} after the first "
        f"{verdict['warmup_s'] / 60:g} min"
    )
    if verdict["flat"] is None:
        return f"{head}: unknown ({verdict['note']})."
    parts = []
    for key, label in (("rss_main_mib", "main"), ("rss_total_mib", "main+workers")):
        v = verdict[key]
        parts.append(
            f"{label} {'yes' if v['flat'] else 'NO'} ({v['baseline_mib']:,.0f} -> "
            f"{v['end_mib']:,.0f} MiB, largest drift {v['max_drift']:.1%}, "
            f"{v['slope_mib_per_min']:+.1f} MiB/min)"
        )
    return f"{head}: {'yes' if verdict['flat'] else 'NO'}. " + "; ".join(parts) + "."


# ------------------------------------------------------------------------------- report


def row_cells(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['t_s'] / 60:.2f}",
        str(row["epoch"]),
        str(row["steps"]),
        _f(row["step_ms"]),
        _f(row["rss_main_mib"], 0),
        _f(row["rss_total_mib"], 0),
        str(row["workers"]),
        _f(row["pss_total_mib"], 0),
    ]


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    q = meta["composition"]
    out = [
        "# Soak",
        "",
        f"`{meta['command']}`: {meta['minutes']:g} min of training (trainer.max_time), a row "
        f"every {meta['interval_seconds']:g} s; torch {meta['torch']}, Lightning "
        f"{meta['lightning']}, {meta['threads']} torch thread(s), {meta['cpu_count']} CPUs, "
        f"memory via {meta['memory_source']}.",
        "",
        f"Composition: fusion={q['fusion']} (hidden {q['fusion_hidden_dim']}), {q['visual']} "
        f"stages {q['visual_stages']} (freeze {q['visual_freeze']}), {q['text']}, "
        f"{q['image_size']} px, batch {q['batch_size']}, {q['num_workers']} loader workers, "
        f"features {meta['features']}, precision {q['precision']}.",
    ]
    if meta.get("other_processes_cores") is not None:
        out += [
            "",
            f"Wall {meta['wall_s']:.0f} s; other processes used "
            f"{meta['other_processes_cores']:.2f} cores on average meanwhile (/proc/stat minus "
            "this run's own CPU time): read step times with that in mind.",
        ]
    out += [
        "",
        "ms/step: mean training step (no data wait, no validation) over the steps of the row's "
        "interval. RSS of main+workers counts shared pages once per process; PSS does not.",
        "",
        *_table(
            [c for c, _ in COLUMNS], "".join(a for _, a in COLUMNS), map(row_cells, report["rows"])
        ),
    ]
    if report.get("verdict") is not None:
        out += ["", verdict_text(report["verdict"])]
    return "\n".join(out) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "soak.md").write_text(markdown(report))


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall time")
    parser.add_argument(
        "--interval-seconds", type=float, default=60.0, help="seconds between rows (default 60)"
    )
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=3.0,
        help="rows before this are left out of the flatness verdict (default 3)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.05, help="flat: within this fraction (0.05)"
    )
    parser.add_argument(
        "--max-epochs", type=int, default=100_000, help="epoch budget, larger than the time allows"
    )
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's, as `make train`)"
    )
    parser.add_argument(
        "--out", type=Path, help="report folder (default logs/soak/<YYYY-mm-dd_HH-MM-SS>)"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the tests' tiny composition from images (no feature cache) instead of the quick-start",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the soak, write ``soak.json`` / ``soak.md``; returns the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with quieted():
        return run(args, argv)


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    global _ACTIVE
    set_project_root()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or ROOT / "logs" / "soak" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    overrides = [
        *(TINY if args.tiny else SOAK_BASE),
        *SOAK_OVERRIDES,
        f"trainer.max_epochs={args.max_epochs}",
        *args.overrides,
    ]
    minutes, seconds = divmod(max(1, round(args.minutes * 60)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    max_time = f"{days:02d}:{hours:02d}:{minutes:02d}:{seconds:02d}"  # Lightning's DD:HH:MM:SS

    cfg: DictConfig = compose_config(overrides, out / "run")
    features = cfg.data.features
    build_feature_stores(cfg)  # before the clock starts; train() then finds the stores complete
    cfg.trainer.max_time = max_time
    with open_dict(cfg):
        cfg.callbacks.soak_monitor = {"_target_": f"{__name__}.active_monitor"}

    report: dict[str, Any] = {
        "meta": {
            "command": shlex.join(
                [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
            ),
            "overrides": overrides,
            "minutes": args.minutes,
            "max_time": max_time,
            "interval_seconds": args.interval_seconds,
            "warmup_minutes": args.warmup_minutes,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "python": platform.python_version(),
            "memory_source": "psutil" if psutil is not None else "/proc",
            "features": features,
            "composition": describe(cfg),
            "run_dir": str(out / "run"),
        },
        "rows": [],
        "verdict": None,
    }
    header = _table([c for c, _ in COLUMNS], "".join(a for _, a in COLUMNS), [])
    printed_header = False

    def on_row(row: dict[str, Any]) -> None:
        nonlocal printed_header
        if not printed_header:
            print("\n".join(header), flush=True)
            printed_header = True
        print("| " + " | ".join(row_cells(row)) + " |", flush=True)
        report["rows"] = list(monitor.rows)
        write_report(out, report)

    monitor = SoakMonitor(args.interval_seconds, on_row)
    _ACTIVE = monitor
    log.info("soak: %s of training, report in %s", max_time, out)
    started = time.perf_counter()
    busy_start, own_start = machine_busy_seconds(), own_cpu_seconds()
    try:
        apply_extras(cfg)
        train(cfg)
    finally:
        monitor.stop()
        _ACTIVE = None
        wall = time.perf_counter() - started
        own = own_cpu_seconds() - own_start
        busy_end = machine_busy_seconds()
        others = None if busy_start is None or busy_end is None else busy_end - busy_start - own
        report["meta"] |= {
            "wall_s": wall,
            "load_average": os.getloadavg(),
            "other_processes_cores": None if others is None else max(0.0, others) / wall,
        }
        report["rows"] = list(monitor.rows)
        report["verdict"] = flatness(monitor.rows, args.warmup_minutes * 60, args.tolerance)
        write_report(out, report)
    print(verdict_text(report["verdict"]), flush=True)
    log.info("wrote %s and %s", out / "soak.json", out / "soak.md")
    return report


if __name__ == "__main__":
    main()
