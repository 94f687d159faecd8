"""scripts/soak.py (`make soak`): a seconds-long soak on the tiny composition writes its rows and
verdict, and the flatness verdict's arithmetic on made-up rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import soak


def test_short_soak_reports_memory_step_times_and_verdict(
    tmp_path: Path, shared_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soak"
    report = soak.main(
        [
            "--tiny",
            "--minutes=0.1",
            "--interval-seconds=1",
            "--warmup-minutes=0.05",
            f"--out={out}",
            f"paths.data_dir={shared_data_dir}",
            "data.num_workers=1",  # a loader worker to count beside the main process
        ]
    )
    rows = report["rows"]
    assert len(rows) >= 3
    assert all(0 < r["rss_main_mib"] <= r["rss_total_mib"] for r in rows)
    assert any(r["workers"] >= 1 for r in rows)
    step_ms = [r["step_ms"] for r in rows if r["steps"]]
    assert step_ms and all(ms > 0 for ms in step_ms)
    verdict = report["verdict"]
    assert verdict["flat"] in (True, False)
    assert {"max_drift", "slope_mib_per_min", "flat"} <= set(verdict["rss_total_mib"])

    assert json.loads((out / "soak.json").read_text())["rows"] == json.loads(json.dumps(rows))
    markdown = (out / "soak.md").read_text()
    printed = capsys.readouterr().out
    for text in (markdown, printed):
        assert "| t (min) | epoch | steps | ms/step | main RSS MiB |" in text
        assert "RSS flat within 5% after the first 0.05 min: " in text
    assert (out / "run" / "checkpoints" / "last.ckpt").is_file()  # the fit ran as train.py's


def rows(*rss: float, step: float = 60.0) -> list[dict]:
    return [
        {"t_s": (i + 1) * step, "rss_main_mib": v, "rss_total_mib": 2 * v}
        for i, v in enumerate(rss)
    ]


def test_flatness_verdict() -> None:
    flat = soak.flatness(rows(500, 900, 1000, 1020, 990, 1040), warmup_s=180, tolerance=0.05)
    assert flat["flat"] is True  # the warm-up's growth does not count
    assert flat["rss_main_mib"]["baseline_mib"] == 1000
    assert flat["rss_main_mib"]["max_drift"] == pytest.approx(0.04)

    leak = soak.flatness(rows(1000, 1000, 1000, 1030, 1060), warmup_s=180, tolerance=0.05)
    assert leak["flat"] is False and leak["rss_main_mib"]["max_drift"] == pytest.approx(0.06)
    assert leak["rss_main_mib"]["slope_mib_per_min"] == pytest.approx(30.0)
    assert "NO" in soak.verdict_text(leak)

    short = soak.flatness(rows(1000, 1000), warmup_s=180, tolerance=0.05)
    assert short["flat"] is None and "unknown" in soak.verdict_text(short)
