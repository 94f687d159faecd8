"""Section 1, ``fusions``: training samples/s and peak memory per fusion block, from images and from
cached features (each configuration in a fresh process with ``isolate``)."""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from scripts.bench.common import (
    MEMORY_METHOD_CPU,
    MEMORY_METHOD_CUDA,
    BareLoop,
    Context,
    Sizes,
    TensorMemoryTracker,
    collect_batches,
    compose_config,
    max_rss_mib,
    mib,
    num_samples,
    quiet,
    rss_mib,
    state_tensors,
    synchronize,
    to_device,
)
from vqa.cli.train import build_components

# ------------------------------------------------------------------------------- section 1


def fusion_overrides(sizes: Sizes, fusion: str, path: str, feature_dir: Path | None) -> list[str]:
    overrides = [*sizes.base_overrides, f"fusion={fusion}", "data.num_workers=0"]
    if path == "cached":
        overrides += [
            "model.visual.freeze=all",
            "data.features=cached",
            f"data.feature_dir={feature_dir}",
            # only the training split's store is built: the validation loader is never timed
            "data.val_split=${data.train_split}",
        ]
    return overrides


def measure_training(spec: dict[str, Any]) -> dict[str, Any]:
    """Training-step throughput and peak memory of one composed configuration, batches in
    memory (the loader's own rate is the pipeline section). Runs in-process or in a fresh
    forkserver child (``spec['isolated']``)."""
    start_rss = rss_mib()
    torch.set_num_threads(spec["threads"])
    quiet()
    device = torch.device(spec["device"])
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        cfg = compose_config(spec["overrides"], Path(tmp))
        pl.seed_everything(cfg.seed, verbose=False)
        datamodule, module = build_components(cfg)
        module.to(device).train()
        warmup, steps = spec["warmup"], spec["steps"]
        batches = [to_device(b, device) for b in collect_batches(datamodule, warmup + steps)]
        loop = BareLoop(
            module, warmup + steps + 1, cfg.trainer.gradient_clip_val, cfg.trainer.precision, device
        )
        for batch in batches[:warmup]:
            loop.step(batch)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        for batch in batches[warmup:]:
            loop.step(batch)
        synchronize(device)
        seconds = time.perf_counter() - begin
        samples = sum(num_samples(b) for b in batches[warmup:])
        images = sum(b.num_images for b in batches[warmup:])
        result: dict[str, Any] = {
            "samples_per_s": samples / seconds,
            "images_per_s": images / seconds,
            "step_ms": 1000 * seconds / steps,
            "batch_questions": samples / steps,
            "batch_images": images / steps,
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "visual_frozen": not any(p.requires_grad for p in module.net.visual.parameters()),
        }
        if device.type == "cuda":
            result["peak_memory_mib"] = mib(torch.cuda.max_memory_allocated(device))
        else:
            batch = batches[0]
            with TensorMemoryTracker(state_tensors(module, loop.optimizer, batch)) as tracker:
                loop.step(batch)
            result["peak_memory_mib"] = mib(tracker.peak)
        if spec.get("isolated"):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
            result["peak_rss_mib"] = max_rss_mib()
            result["rss_increase_mib"] = max_rss_mib() - start_rss
    return result


def _forkserver_pool() -> ProcessPoolExecutor:
    """One fresh process per task, forked from a server that only imported the libraries: no
    configuration's memory or threads leak into the next, and each skips the imports."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "pytorch_lightning", "transformers", "vqa.cli.train"])
    return ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1)


def run_specs(specs: list[dict[str, Any]], isolate: bool) -> list[dict[str, Any]]:
    if not isolate:
        return [measure_training(spec) for spec in specs]
    with _forkserver_pool() as pool:
        return [
            pool.submit(measure_training, {**spec, "isolated": True}).result() for spec in specs
        ]


def section_fusions(ctx: Context) -> dict[str, Any]:
    store = ctx.feature_store()
    specs = []
    for fusion in ctx.fusions:
        for path in ("images", "cached"):
            specs.append(ctx.spec(fusion_overrides(ctx.sizes, fusion, path, store["feature_dir"])))
            specs[-1]["label"] = (fusion, path)
    results = run_specs(specs, ctx.isolate)
    rows = [
        {"fusion": spec["label"][0], "path": spec["label"][1], **result}
        for spec, result in zip(specs, results, strict=True)
    ]
    return {
        "config": " ".join([*ctx.sizes.base_overrides, "fusion=<name>"]),
        "cached_note": (
            "the quick-start trains its visual encoder, so the cached rows run with "
            "model.visual.freeze=all (the encoder is skipped: its stage maps come from the store)"
        ),
        "feature_store": store,
        "warmup_steps": ctx.sizes.warmup,
        "timed_steps": ctx.sizes.steps,
        "isolated": ctx.isolate,
        "memory_method": MEMORY_METHOD_CUDA if ctx.device.type == "cuda" else MEMORY_METHOD_CPU,
        "rows": rows,
    }
