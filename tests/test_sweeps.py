"""Sweeps: Hydra multirun and the Optuna search run end to end on tiny sizes, and
scripts/summarize_sweep.py turns a multirun folder into mean ± std tables and a plot."""

from __future__ import annotations

import csv
import math
import os
import statistics
from pathlib import Path

import matplotlib.image
import pytest
from omegaconf import OmegaConf

from scripts.summarize_sweep import find_sweep, read_metrics, read_overrides, summarize
from tests.helpers import (
    TINY_DATA_OVERRIDES,
    TINY_OVERRIDES,
    train_multirun_in_process,
)

# One short epoch per job, nothing written but the CSV logs the summary reads.
JOB_OVERRIDES = [
    *TINY_OVERRIDES,
    *TINY_DATA_OVERRIDES,
    "callbacks.model_checkpoint=null",
    "callbacks.lr_monitor=null",
    "trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "test=false",
]


def run_train_cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_dir: Path, *args: str
) -> Path:
    """``python train.py -m ARGS`` with the sweep jobs' overrides; returns the sweep folder.
    ARGS come last so that an ``experiment=`` among them replaces the tiny ``experiment=none``."""
    return train_multirun_in_process(monkeypatch, tmp_path, data_dir, *JOB_OVERRIDES, *args)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------ summary, fake sweep


def fake_run(
    sweep: Path,
    index: int,
    overrides: list[str],
    val_acc: list[float] | None,
    test: dict[str, float] | None = None,
) -> None:
    """A job folder whose CSV log holds ``val_acc`` per epoch and, after the fit, the ``test``
    metrics (as trainer.test logs them: one last row of their own)."""
    run = sweep / str(index)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    if val_acc is None:
        return  # a failed job: no metrics
    (run / "csv").mkdir()
    test = test or {}
    blank = "," * len(test)
    lines = [
        ",".join(["epoch,step,train/loss_step,val/acc,val/acc_best", *test]),
        f"0,0,2.5,,{blank}",
    ]
    best = 0.0
    for epoch, acc in enumerate(val_acc):
        best = max(best, acc)
        lines.append(f"{epoch},{epoch + 1},,{acc},{best}{blank}")
    if test:
        lines.append(",".join([f"{len(val_acc)},,,,", *map(str, test.values())]))
    (run / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_summary_means_and_stds_over_seeds(tmp_path: Path) -> None:
    sweep = tmp_path / "multiruns" / "2026-01-02_00-00-00"
    accs = {
        ("late", 1): [0.30, 0.35],
        ("late", 2): [0.40, 0.20],
        ("late", 3): [0.31, 0.33],
        ("parallel", 1): [0.50, 0.62],
        ("parallel", 2): [0.58, 0.57],
    }
    for i, ((fusion, seed), acc) in enumerate(accs.items()):
        fake_run(sweep, i, [f"fusion={fusion}", f"seed={seed}", "trainer.max_epochs=2"], acc)
    fake_run(sweep, len(accs), ["fusion=late", "seed=4", "trainer.max_epochs=2"], None)
    fake_run(tmp_path / "multiruns" / "2026-01-01_00-00-00", 0, ["fusion=late"], [0.1])

    assert find_sweep(tmp_path / "multiruns") == sweep  # a folder of sweeps: the newest
    assert read_overrides(sweep / "3") == {
        "fusion": "parallel",
        "seed": "1",
        "trainer.max_epochs": "2",
    }
    assert read_metrics(sweep / "0") == {
        "epoch": 1.0,
        "step": 2.0,
        "train/loss_step": 2.5,
        "val/acc": 0.35,
        "val/acc_best": 0.35,
    }

    markdown = summarize(tmp_path / "multiruns").read_text()
    rows = read_rows(sweep / "summary.csv")
    assert [r["fusion"] for r in rows] == ["parallel", "late"]  # best first; seed is no setting
    for row, fusion in zip(rows, ("parallel", "late"), strict=True):
        best = [max(acc) for (f, _), acc in accs.items() if f == fusion]
        final = [acc[-1] for (f, _), acc in accs.items() if f == fusion]
        assert int(row["runs"]) == int(row["val/acc_best_n"]) == len(best)
        assert float(row["val/acc_best_mean"]) == pytest.approx(statistics.fmean(best))
        assert float(row["val/acc_best_std"]) == pytest.approx(statistics.stdev(best))
        assert float(row["val/acc_mean"]) == pytest.approx(statistics.fmean(final))
    assert "test/acc_mean" not in rows[0]  # no run logged it
    assert "| parallel | 2 | 60.00 ± 2.83 | 59.50 ± 3.54 |" in markdown
    assert "Without metrics (failed?): 5" in markdown
    image = matplotlib.image.imread(sweep / "summary.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_summary_gives_each_settings_wall_time_from_its_job_folders(tmp_path: Path) -> None:
    """Wall: from the job's ``.hydra/`` files (written at its start) to its CSV log's last
    write, in minutes, mean ± std over seeds."""
    sweep = tmp_path / "sweep"
    start = 1_700_000_000.0
    for index, (seed, wall) in enumerate(((1, 300.0), (2, 420.0))):
        fake_run(sweep, index, ["fusion=film", f"seed={seed}"], [0.9])
        for path in (sweep / str(index) / ".hydra").iterdir():
            os.utime(path, (start, start))
        os.utime(sweep / str(index) / "csv" / "metrics.csv", (start + wall, start + wall))
    markdown = summarize(sweep).read_text()
    assert "| wall (min) |" in markdown.splitlines()[2]
    assert markdown.splitlines()[4].endswith("| 6.0 ± 1.4 |")  # 5 and 7 minutes
    (row,) = read_rows(sweep / "summary.csv")
    assert float(row["wall_s_mean"]) == 360.0
    assert float(row["wall_s_std"]) == pytest.approx(statistics.stdev([300.0, 420.0]))


def test_summary_tabulates_the_test_accuracy_per_family(tmp_path: Path) -> None:
    """test/acc and each test/family/<family> column the runs logged: mean ± std over seeds."""
    sweep = tmp_path / "sweep"
    tests = {
        ("late", 1): {"test/acc": 0.50, "test/family/relation": 0.40, "test/family/exists": 0.8},
        ("late", 2): {"test/acc": 0.60, "test/family/relation": 0.50, "test/family/exists": 0.9},
        ("film", 1): {"test/acc": 0.70, "test/family/relation": 0.60, "test/family/exists": 1.0},
        ("film", 2): {"test/acc": 0.80, "test/family/relation": 0.70, "test/family/exists": 1.0},
    }
    for i, ((fusion, seed), test) in enumerate(tests.items()):
        fake_run(sweep, i, [f"fusion={fusion}", f"seed={seed}"], [0.1 * (i + 1)], test)

    markdown = summarize(sweep).read_text()
    header = "| fusion | runs | val/acc_best | val/acc | test/acc | test/family/exists | "
    assert header + "test/family/relation |" in markdown  # families sorted, after test/acc
    late = "| late | 2 | 15.00 ± 7.07 | 15.00 ± 7.07 | 55.00 ± 7.07 | 85.00 ± 7.07 | 45.00 ± 7.07 |"
    assert late in markdown
    rows = {r["fusion"]: r for r in read_rows(sweep / "summary.csv")}
    for fusion in ("late", "film"):
        for metric in ("test/acc", "test/family/exists", "test/family/relation"):
            scores = [t[metric] for (f, _), t in tests.items() if f == fusion]
            assert float(rows[fusion][f"{metric}_mean"]) == pytest.approx(statistics.fmean(scores))
            assert float(rows[fusion][f"{metric}_std"]) == pytest.approx(statistics.stdev(scores))
            assert int(rows[fusion][f"{metric}_n"]) == 2


# --------------------------------------------------------------------------- real sweeps


def test_fusion_multirun_makes_a_summary_table(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `make sweep` runs (the quick-start with hparams_search=fusions, each block with its
    quick-start preset; the first job writes the quick-start's feature store, the second finds
    it complete), on two fusions and one seed."""
    features = tmp_path / "features"
    sweep = run_train_cli(
        monkeypatch,
        tmp_path,
        shared_data_dir,
        "experiment=quickstart",
        "hparams_search=fusions",
        "fusion=parallel,late",
        "seed=1",
        f"data.feature_dir={features}",
    )
    assert sorted(p.name for p in features.iterdir() if p.is_dir()) == ["train2014", "val2014"]
    runs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert [read_overrides(r)["fusion"] for r in runs] == ["parallel", "late"]
    resolved = [OmegaConf.load(r / ".hydra" / "config.yaml") for r in runs]
    assert [c.fusion._target_.rsplit(".", 1)[1] for c in resolved] == [
        "ParallelCoAttention",
        "LateFusion",
    ]
    assert resolved[0].fusion.grid_stride == 2 and resolved[0].fusion.count  # parallel's preset
    assert {c.task_name for c in resolved} == {"sweep_fusions"}

    summarize(sweep)
    rows = {r["fusion"]: r for r in read_rows(sweep / "summary.csv")}
    assert set(rows) == {"parallel", "late"}
    for run in runs:
        row = rows[read_overrides(run)["fusion"]]
        assert float(row["val/acc_best_mean"]) == read_metrics(run)["val/acc_best"]
        assert row["runs"] == "1" and math.isnan(float(row["val/acc_best_std"]))
    assert (sweep / "summary.md").read_text().count("| 1 |") == 2


def test_optuna_search_runs_three_trials(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = run_train_cli(
        monkeypatch,
        tmp_path,
        shared_data_dir,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
    )
    runs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/overrides.yaml"))
    assert len(runs) == 3
    trials = [read_overrides(r) for r in runs]
    learning_rates = [float(t["optimizer.lr"]) for t in trials]
    assert all(5e-5 <= lr <= 3e-3 for lr in learning_rates)
    assert all(0.0 <= float(t["head.dropout"]) <= 0.5 for t in trials)
    assert len(set(learning_rates)) == 3  # sampled, not repeated

    results = OmegaConf.load(sweep / "optimization_results.yaml")
    scores = [read_metrics(r)["val/acc_best"] for r in runs]
    assert results.best_value == pytest.approx(max(scores))
    best_lrs = [
        lr for lr, score in zip(learning_rates, scores, strict=True) if score == max(scores)
    ]
    assert any(results.best_params["optimizer.lr"] == pytest.approx(lr) for lr in best_lrs)

    # every trial is its own setting, best first
    summarize(sweep)
    rows = read_rows(sweep / "summary.csv")
    assert len(rows) == 3 and float(rows[0]["val/acc_best_mean"]) == pytest.approx(max(scores))
