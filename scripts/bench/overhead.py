"""Section 2, ``overhead``: the Lightning module under a real ``Trainer`` vs the bare PyTorch loop."""

from __future__ import annotations

import copy
import gc
import statistics
import sys
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import open_dict

from scripts.bench.common import (
    Context,
    bare_fit,
    collect_batches,
    compose_config,
    lightning_fit,
    log,
    steady_rate,
)
from vqa.cli.train import build_components

# ------------------------------------------------------------------------------- section 2


def section_overhead(ctx: Context) -> dict[str, Any]:
    """Interleaved Lightning / bare runs (ABBA order), each from the same initial weights."""
    sizes = ctx.sizes
    cfg = compose_config([*sizes.base_overrides, "data.num_workers=0"], ctx.workdir / "overhead")
    if ctx.device.type == "cuda":
        with open_dict(cfg):
            cfg.trainer.accelerator, cfg.trainer.devices = "gpu", 1
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, module = build_components(cfg)
    batches = collect_batches(datamodule, sizes.overhead_warmup + sizes.overhead_steps + 1)
    initial = copy.deepcopy(module.state_dict())
    runs: list[dict[str, Any]] = []
    for pair in range(ctx.repeats):
        order = ("lightning", "bare") if pair % 2 == 0 else ("bare", "lightning")
        for kind in order:
            module.load_state_dict(initial)
            torch.manual_seed(cfg.seed)
            gc.collect()
            if kind == "lightning":
                starts, _ = lightning_fit(cfg, module, batches, ctx.workdir / f"overhead/run{pair}")
            else:
                starts = bare_fit(
                    module,
                    batches,
                    clip_val=cfg.trainer.gradient_clip_val,
                    precision=cfg.trainer.precision,
                    device=ctx.device,
                )
            runs.append(
                {"kind": kind, "pair": pair, **steady_rate(starts, batches, sizes.overhead_warmup)}
            )
            log.info("overhead %s %d: %.1f samples/s", kind, pair, runs[-1]["samples_per_s"])
    lightning = statistics.median(r["samples_per_s"] for r in runs if r["kind"] == "lightning")
    bare = statistics.median(r["samples_per_s"] for r in runs if r["kind"] == "bare")
    ratio = lightning / bare
    return {
        "config": " ".join(sizes.base_overrides),
        "trainer": {
            "precision": str(cfg.trainer.precision),
            "gradient_clip_val": cfg.trainer.gradient_clip_val,
            "log_every_n_steps": cfg.trainer.log_every_n_steps,
            "callbacks": sorted(k for k, v in (cfg.get("callbacks") or {}).items() if v),
            "logger": sorted(k for k, v in (cfg.get("logger") or {}).items() if v),
        },
        "disabled": "validation (limit_val_batches=0, no sanity check): the bare loop does not "
        "validate; the fit's end (last checkpoint, logger flush) is outside the timed window",
        "timed_steps": sizes.overhead_steps,
        "warmup_steps": sizes.overhead_warmup,
        "pairs": ctx.repeats,
        "progress_bar_on_terminal": sys.stderr.isatty(),  # rich renders live only on a TTY
        "lightning_samples_per_s": lightning,
        "bare_samples_per_s": bare,
        "ratio": ratio,
        "overhead_percent": 100 * (bare / lightning - 1),
        "goal_percent": 5.0,
        "runs": runs,
    }
