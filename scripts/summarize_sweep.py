"""Summarise a Hydra multirun: one row per setting, mean ± std over its seeds, and a plot.

    python scripts/summarize_sweep.py logs/sweep_fusions/multiruns/2026-01-01_12-00-00
    python scripts/summarize_sweep.py logs/sweep_fusions/multiruns       # the newest sweep

A setting is what a run's ``.hydra/overrides.yaml`` sets to a value that differs between runs,
``seed`` excepted: runs that differ only in their seed are repeats of one setting. Metrics are
the last value each logged in its CSV log (``csv/metrics.csv``: ``val/acc_best`` is a running
maximum, so its last value is the best epoch), and after them the test accuracy of each group
the runs logged (``test/family/<family>``: the synthetic set's question families), whatever
groups the CSV columns name, and the run's wall time (from the job folder's ``.hydra/`` files,
written when the job starts, to its CSV log's last write: the whole job, data, feature store
and test included; a resumed run's is not meaningful). Writes ``summary.md``, ``summary.csv``
and ``summary.png`` (val accuracy per setting) into the sweep folder, or ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from matplotlib.figure import Figure
from omegaconf import OmegaConf

METRICS = ("val/acc_best", "val/acc", "test/acc")
# Prefixes of per-group accuracies, tabulated after METRICS when runs logged them; the group
# names come from the runs' CSV columns (test/family/exists, ...), not from a list kept here.
METRIC_GROUPS = ("test/family/",)
REPEAT_KEYS = ("seed",)


@dataclass(frozen=True)
class Run:
    """One job of the sweep: its overrides and the last value of each logged metric."""

    overrides: dict[str, str]
    metrics: dict[str, float]
    wall_s: float = math.nan


@dataclass
class Setting:
    """Runs sharing every override but the seed."""

    values: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)

    def scores(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if metric in r.metrics]

    def walls(self) -> list[float]:
        return [r.wall_s for r in self.runs if not math.isnan(r.wall_s)]


def is_sweep(path: Path) -> bool:
    """Whether ``path`` holds Hydra job folders (``<n>/.hydra/overrides.yaml``)."""
    return any(path.glob("*/.hydra/overrides.yaml"))


def find_sweep(path: Path) -> Path:
    """``path`` if it is a sweep, else the newest sweep inside it (timestamped names sort)."""
    if is_sweep(path):
        return path
    sweeps = sorted(p for p in path.iterdir() if p.is_dir() and is_sweep(p))
    if not sweeps:
        raise FileNotFoundError(f"{path} holds no Hydra job folders (<n>/.hydra/), nor a sweep")
    return sweeps[-1]


def read_overrides(run_dir: Path) -> dict[str, str]:
    """``key -> value`` of the job's command-line overrides, as Hydra parses them."""
    lines = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    parsed = OverridesParser.create().parse_overrides([str(line) for line in lines])
    return {o.key_or_group: o.get_value_element_as_str() for o in parsed}


def read_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in the run's CSV logs (one row per log call,
    blanks where a metric was not logged)."""
    last: dict[str, float] = {}
    for path in sorted(run_dir.rglob("metrics.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                last |= {k: float(v) for k, v in row.items() if k and v not in ("", None)}
    return last


def wall_seconds(run_dir: Path) -> float:
    """From the job's start (Hydra writes ``.hydra/`` first) to its CSV log's last write."""
    logs = list(run_dir.rglob("metrics.csv"))
    if not logs:
        return math.nan
    start = min(p.stat().st_mtime for p in (run_dir / ".hydra").iterdir())
    return max(p.stat().st_mtime for p in logs) - start


def load_runs(sweep: Path) -> tuple[list[Run], list[Path]]:
    """Runs with metrics, and the job folders without any (failed, or no CSV logger)."""
    runs, missing = [], []
    for overrides in sorted(sweep.glob("*/.hydra/overrides.yaml")):
        run_dir = overrides.parent.parent
        metrics = read_metrics(run_dir)
        if metrics:
            runs.append(Run(read_overrides(run_dir), metrics, wall_seconds(run_dir)))
        else:
            missing.append(run_dir)
    return runs, missing


def group(runs: Sequence[Run]) -> tuple[list[str], list[Setting]]:
    """The keys that vary between runs (seed excepted) and the settings they define."""
    keys = sorted({k for r in runs for k in r.overrides} - set(REPEAT_KEYS))
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    settings: dict[tuple[str, ...], Setting] = {}
    for run in runs:
        values = tuple(run.overrides.get(k, "") for k in varying)
        settings.setdefault(values, Setting(values)).runs.append(run)
    return varying, list(settings.values())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single run: no spread to estimate)."""
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


def metrics_present(runs: Sequence[Run]) -> list[str]:
    """METRICS that some run logged, then the METRIC_GROUPS columns any run logged, sorted."""
    fixed = [m for m in METRICS if any(m in r.metrics for r in runs)]
    grouped = sorted({k for r in runs for k in r.metrics if k.startswith(METRIC_GROUPS)})
    return fixed + grouped


def ordered(settings: list[Setting], metric: str) -> list[Setting]:
    """Best first by the mean of ``metric``; settings without it last."""

    def key(setting: Setting) -> tuple[bool, float]:
        mean = mean_std(setting.scores(metric))[0]
        return math.isnan(mean), -mean

    return sorted(settings, key=key)


def short(value: str) -> str:
    """Sampled floats (Optuna) to 4 significant digits; anything else as given."""
    try:
        return f"{float(value):.4g}" if "." in value or "e" in value else value
    except ValueError:
        return value


def to_markdown(keys: list[str], settings: list[Setting], metrics: list[str]) -> str:
    """Accuracies in percent, ``mean ± std`` over the runs of each setting; wall in minutes."""
    header = [*(keys or ["setting"]), "runs", *metrics, "wall (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in settings:
        cells = [short(v) for v in s.values] if keys else ["all runs"]
        cells.append(str(len(s.runs)))
        for metric in metrics:
            mean, std = mean_std(s.scores(metric))
            spread = "" if math.isnan(std) else f" ± {100 * std:.2f}"
            cells.append("–" if math.isnan(mean) else f"{100 * mean:.2f}{spread}")
        wall, wall_std = mean_std([w / 60 for w in s.walls()])
        spread = "" if math.isnan(wall_std) else f" ± {wall_std:.1f}"
        cells.append("–" if math.isnan(wall) else f"{wall:.1f}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, keys: list[str], settings: list[Setting], metrics: list[str]) -> None:
    """Fractions as logged: one row per setting with mean, std and run count per metric."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                *keys,
                "runs",
                *(f"{m}_{stat}" for m in metrics for stat in ("mean", "std", "n")),
                "wall_s_mean",
                "wall_s_std",
            ]
        )
        for s in settings:
            stats = []
            for metric in metrics:
                scores = s.scores(metric)
                stats += [*mean_std(scores), len(scores)]
            writer.writerow([*s.values, len(s.runs), *stats, *mean_std(s.walls())])


def plot(path: Path, keys: list[str], settings: list[Setting], metric: str) -> None:
    """Bars: mean over seeds with a ± std whisker; dots: the individual runs."""
    labels = [
        "\n".join(f"{k.rsplit('.', 1)[-1]}={short(v)}" for k, v in zip(keys, s.values, strict=True))
        or "all runs"
        for s in settings
    ]
    # A bare Figure (no pyplot): no GUI backend, no global state, fine on a cluster node.
    width = (1.0 + 0.6 * len(keys)) * len(settings) + 1.5
    fig = Figure(figsize=(max(4.0, width), 4.0 + 0.3 * len(keys)))
    fig.set_layout_engine("constrained")
    ax = fig.subplots()
    for x, s in enumerate(settings):
        scores = [100 * v for v in s.scores(metric)]
        mean, std = mean_std(scores)
        ax.bar(x, mean, yerr=0 if math.isnan(std) else std, capsize=4, color="tab:blue", alpha=0.6)
        ax.scatter([x] * len(scores), scores, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(settings)), labels, fontsize="small")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric}: mean ± std over seeds, dots = runs")
    fig.savefig(path, dpi=120)


def summarize(sweep: Path, out: Path | None = None) -> Path:
    """Write summary.md/.csv/.png for ``sweep`` into ``out`` (default: the sweep); returns the
    markdown file."""
    sweep = find_sweep(sweep)
    out = out or sweep
    out.mkdir(parents=True, exist_ok=True)
    runs, missing = load_runs(sweep)
    if not runs:
        raise FileNotFoundError(
            f"no run of {sweep} logged metrics (csv/metrics.csv); was logger=csv set?"
        )
    keys, settings = group(runs)
    metrics = metrics_present(runs)
    if not metrics:
        raise ValueError(f"no run of {sweep} logged any of {list(METRICS)}")
    settings = ordered(settings, metrics[0])
    text = f"# {sweep}\n\n" + to_markdown(keys, settings, metrics)
    if missing:
        text += "\nWithout metrics (failed?): " + ", ".join(p.name for p in missing) + "\n"
    markdown = out / "summary.md"
    markdown.write_text(text)
    write_csv(out / "summary.csv", keys, settings, metrics)
    plot(out / "summary.png", keys, settings, metrics[0])  # val/acc_best when logged
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a multirun folder, or a folder of them")
    parser.add_argument("--out", type=Path, default=None, help="default: the sweep folder")
    args = parser.parse_args(argv)
    markdown = summarize(args.sweep, args.out)
    print(markdown.read_text(), end="")
    print(f"\nwrote {markdown}, summary.csv and summary.png beside it")


if __name__ == "__main__":
    main()
