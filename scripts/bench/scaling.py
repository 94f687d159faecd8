"""Section 4, ``scaling``: fusion blocks alone as the grid and the question grow, dense vs ``top_k``."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from scripts.bench.common import (
    Context,
    Sizes,
    TensorMemoryTracker,
    log,
    mib,
    state_tensors,
    synchronize,
)
from vqa.utils.project import (
    CONFIG_DIR,
)

# ------------------------------------------------------------------------------- section 4


def build_block(fusion: str, sizes: Sizes, top_k: int | None) -> nn.Module:
    cfg = OmegaConf.load(CONFIG_DIR / "fusion" / f"{fusion}.yaml")
    if sizes.scale_hidden is not None:
        cfg.hidden_dim = sizes.scale_hidden
    if "top_k" in cfg:
        cfg.top_k = top_k
    return instantiate(cfg)(
        visual_channels=list(sizes.scale_channels), text_dim=sizes.scale_text_dim
    )


def block_inputs(sizes: Sizes, grid: int, length: int, device: torch.device) -> tuple:
    """Encoder-shaped random inputs (they require grad, as with fine-tuned encoders); each
    shallower stage is twice as fine as the next, as in a ResNet."""
    depth = len(sizes.scale_channels)
    visual = [
        torch.randn(
            sizes.scale_batch,
            c,
            grid * 2 ** (depth - 1 - i),
            grid * 2 ** (depth - 1 - i),
            device=device,
            requires_grad=True,
        )
        for i, c in enumerate(sizes.scale_channels)
    ]
    text = torch.randn(
        sizes.scale_batch, length, sizes.scale_text_dim, device=device, requires_grad=True
    )
    return visual, text, torch.ones(sizes.scale_batch, length, dtype=torch.bool, device=device)


def block_step(block: nn.Module, inputs: tuple) -> None:
    block.zero_grad(set_to_none=True)
    for t in [*inputs[0], inputs[1]]:
        t.grad = None
    block(*inputs).features.sum().backward()


def block_step_memory(block: nn.Module, inputs: tuple, device: torch.device) -> int:
    """Bytes a forward + backward adds on top of parameters and inputs (activations, gradients,
    temporaries) at its peak."""
    block.zero_grad(set_to_none=True)
    for t in [*inputs[0], inputs[1]]:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        block_step(block, inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with TensorMemoryTracker(state_tensors(block, inputs)) as tracker:
        block_step(block, inputs)
    return tracker.increase


def section_scaling(ctx: Context) -> dict[str, Any]:
    sizes, device = ctx.sizes, ctx.device
    grid0, length0 = sizes.grids[0], sizes.lengths[0]
    settings = [(g, length0) for g in sizes.grids] + [(grid0, n) for n in sizes.lengths[1:]]
    rows = []
    for fusion in ctx.fusions:
        has_top_k = "top_k" in OmegaConf.load(CONFIG_DIR / "fusion" / f"{fusion}.yaml")
        for top_k in [None, sizes.top_k] if has_top_k else [None]:
            torch.manual_seed(0)
            block = build_block(fusion, sizes, top_k).to(device).train()
            inputs = [block_inputs(sizes, g, n, device) for g, n in settings]
            samples: list[list[float]] = [[] for _ in settings]
            # Settings interleaved within every repeat: drifting load hits all alike.
            for repeat in range(sizes.scale_warmup + ctx.scale_repeats):
                for x, sample in zip(inputs, samples, strict=True):
                    synchronize(device)
                    begin = time.perf_counter()
                    block_step(block, x)
                    synchronize(device)
                    if repeat >= sizes.scale_warmup:
                        sample.append(1000 * (time.perf_counter() - begin))
            memory = [block_step_memory(block, x, device) for x in inputs]
            for (grid, length), sample, nbytes in zip(settings, samples, memory, strict=True):
                rows.append(
                    {
                        "fusion": fusion,
                        "attention": "no top_k option"
                        if not has_top_k
                        else ("dense" if top_k is None else f"top-{top_k}"),
                        "top_k": top_k,
                        "grid": grid,
                        "length": length,
                        "ms": statistics.median(sample),
                        "memory_mib": mib(nbytes),
                        "params": sum(p.numel() for p in block.parameters()),
                        "out_dim": block.out_dim,
                    }
                )
            del block, inputs
            log.info("scaling: %s top_k=%s done", fusion, top_k)
    return {
        "batch": sizes.scale_batch,
        "channels": list(sizes.scale_channels),
        "text_dim": sizes.scale_text_dim,
        "hidden_dim": sizes.scale_hidden or "per yaml",
        "repeats": ctx.scale_repeats,
        "base": {"grid": grid0, "length": length0},
        "settings": [{"grid": g, "length": n} for g, n in settings],
        "note": "fusion block alone, forward + backward in train mode, random encoder-shaped "
        "inputs (all tokens real); ms = median over repeats, settings interleaved; memory = peak "
        "above parameters and inputs (activations, gradients, temporaries). top-k "
        "(vqa.models.fusion.base.keep_top_k) masks all but the k largest logits after every "
        "logit is computed: it changes which cells are attended, not how many are scored.",
        "rows": rows,
    }
