"""Benchmarks (`make bench`): training throughput and memory per fusion block, Lightning overhead,
input pipeline vs model, fusion scaling with grid and question length, a GPU mode that exposes the
step's fixed cost, and the kernels and host syncs of one training step.

    python scripts/benchmark.py                      # everything, quick-start sizes (< 10 min, 2 CPUs)
    python scripts/benchmark.py --sections overhead pipeline --repeats 7
    python scripts/benchmark.py --quick              # tiny sizes (what the tests run)
    python scripts/benchmark.py --sections gpu       # on a CUDA machine (scripts/gpu_check.sh)
    python scripts/benchmark.py --sections gpu --gpu-rows sweep graphs

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (default ``logs/bench``) and prints the
markdown. Sections (``--sections``, by name or number):

1. ``fusions``: per ``configs/fusion/*.yaml``, training samples/s and peak memory of the quick-start
   composition (``experiment=quickstart fusion=<name>``), from images and from cached features.
2. ``overhead``: the Lightning module under a real ``Trainer`` vs the bare PyTorch loop below, same
   model, batches, precision, clipping, optimizer and schedule (tests prove the weights agree).
3. ``pipeline``: data-loader samples/s (quick-start ``num_workers``) vs the training step's rate;
   and the ``data=vqav2`` train loader at the VQA v2 recipe's 448 px on COCO-sized (640x480)
   JPEGs with 1 and 2 workers, the per-image cost of decode, resize and normalise in-process
   (PIL and ``torchvision.io.decode_jpeg``), and an extrapolation to 16 workers (labelled as such).
4. ``scaling``: fusion blocks alone (ResNet-101 layer3/layer4 channels, 768-d text) as the grid and
   the question grow, dense vs ``top_k`` sparse attention (folds the former model_stats.py).
5. ``gpu``: ResNet-101 @ 448 px + bert-base (random init), bf16-mixed, channels_last, rows chosen
   with ``--gpu-rows``: ``sweep`` (4 / 32 / 128 images of one question per step: the intercept of
   step time over images is the step's fixed cost), ``grouped`` (32 images x 5 questions, as VQA
   v2's 5.4), ``optimizer`` (AdamW foreach vs fused), ``lightning`` (Trainer vs bare loop),
   ``anchor`` (torchvision ResNet-101 alone, fused AdamW), ``e2e`` (``train.py
   experiment=vqav2_resnet101_bert`` on the synthetic set at 448 px, questions/s from step
   timestamps), ``graphs`` (eager vs ``torch.compile(mode="reduce-overhead")``, i.e. CUDA graphs),
   each with model-FLOPs utilisation. Without CUDA every row is recorded as skipped with its
   reason; ``--gpu-smoke`` runs the same code on CPU at tiny sizes (graphs still skipped there).
6. ``ops``: per fusion block, the aten ops (a proxy for kernel launches) and host syncs of one
   training step, bare loop and Lightning (``vqa.utils.op_counter``), with the most frequent ops.
   Device-independent, so it runs on a CPU too.

Timings use ``--threads`` torch threads in every process (default 1: reproducible on a shared
machine; ``--threads 2`` on a quiet 2-core one). The header reports how much CPU other processes
took during the run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `scripts.extract_features` when run as `python scripts/...`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402
from torchvision.io import decode_jpeg  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from transformers import get_cosine_with_min_lr_schedule_with_warmup  # noqa: E402

from vqa.data.batch import VQABatch  # noqa: E402
from vqa.data.dataset import VQADataset, row_image  # noqa: E402
from vqa.data.images import load_rgb  # noqa: E402
from vqa.data.shapes import ShapesConfig, generate  # noqa: E402
from vqa.lit_module import VQALitModule  # noqa: E402
from vqa.metrics import ANSWER_TYPES  # noqa: E402
from vqa.train import build_components  # noqa: E402
from vqa.utils import (  # noqa: E402
    drop_logger_only_callbacks,
    instantiate_callbacks,
    instantiate_loggers,
    set_project_root,
)
from vqa.utils.op_counter import StepOps, count_ops  # noqa: E402
from vqa.utils.project import (  # noqa: E402
    CONFIG_DIR,
    TINY_DATA_OVERRIDES,
    TINY_MODEL_OVERRIDES,
    compose_run_config,
    silence_known_noise,
)

log = logging.getLogger("benchmark")

SECTIONS = ("fusions", "overhead", "pipeline", "scaling", "gpu", "ops")
GPU_ROWS = ("sweep", "grouped", "optimizer", "lightning", "anchor", "e2e", "graphs")
# Peak dense bf16 tensor-core FLOP/s by device name (first substring match wins; NVIDIA specs).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.4e12),
    ("A100", 312e12),
)
FLOP_METHOD = (
    "torch.utils.flop_counter.FlopCounterMode over one training step's forward + backward "
    "(eager, optimizer excluded): matmul, convolution and attention kernels, 2 FLOPs per "
    "multiply-add; elementwise ops and norms are not counted. MFU = FLOPs/step x steps/s / peak "
    "dense bf16 FLOP/s of the device."
)
MEMORY_METHOD_CPU = (
    "CPU: peak tensor memory = the largest total size of live tensor storages during one training "
    "step (parameters, gradients, optimizer state, batch and activations), tracked op by op with a "
    "TorchDispatchMode (allocator slack and library scratch buffers are not seen). With isolation, "
    "also peak RSS (ru_maxrss) of a fresh process forked per configuration from a forkserver that "
    "only imported the libraries, and its increase over that process's starting RSS."
)
MEMORY_METHOD_CUDA = (
    "CUDA: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats."
)


# ------------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """Every size the sections use; ``quick`` shrinks them for tests."""

    base_overrides: list[str]
    warmup: int = 2  # section 1 untimed steps
    steps: int = 8  # section 1 timed steps
    overhead_warmup: int = 4
    overhead_steps: int = 24
    loader_batches: int = 40
    jpeg_images: int = 200  # COCO-sized JPEGs of the data=vqav2 loader rows
    jpeg_questions_per_image: int = 5
    jpeg_workers: tuple[int, ...] = (1, 2)
    jpeg_epochs: int = 4  # timed, after one untimed epoch
    jpeg_passes: int = 5  # in-process passes over the images per stage, median kept
    scale_batch: int = 8
    scale_channels: tuple[int, ...] = (1024, 2048)
    scale_text_dim: int = 768
    scale_hidden: int | None = None  # None: each block's yaml
    grids: tuple[int, ...] = (7, 14, 28)
    lengths: tuple[int, ...] = (14, 28, 56)
    top_k: int = 16
    scale_warmup: int = 1
    gpu_overrides: list[str] = field(
        default_factory=lambda: [
            "model/visual=resnet101",
            "model/text=bert_base_random",
            "data.image_size=448",
            "model.visual.channels_last=true",
            "trainer=gpu",
        ]
    )
    gpu_batch: int = 32  # images (one question each) of the optimizer/lightning/anchor/graphs rows
    gpu_sweep: tuple[int, ...] = (4, 32, 128)  # images per step, one question each
    gpu_grouped: tuple[int, int] = (32, 5)  # images, questions per image (VQA v2 has 5.4)
    gpu_length: int = 14
    gpu_vocab: int = 30522  # bert-base-uncased
    gpu_answers: int = 3129  # VQA v2
    gpu_warmup: int = 5
    gpu_steps: int = 20
    # cudagraph trees run a compiled graph eagerly once, record it on the next call and replay
    # from then on: these untimed steps come on top of gpu_warmup.
    graphs_warmup: int = 3
    e2e_overrides: list[str] = field(default_factory=lambda: list(E2E_RECIPE))
    e2e_seconds: float = 60.0  # trainer.max_time of the train.py run
    e2e_steps: int = -1  # trainer.max_steps (-1: the time decides)
    e2e_warmup: int = 20  # steps left out of the rate (cuDNN's first calls, the workers' start)
    ops_first: int = 1  # the counted step: step 0 creates the optimizer state


# The quick-start reads its frozen encoder's maps from the feature cache; the benchmark's base is
# the end-to-end image path with the encoder trained, and its *cached* rows freeze it and read a
# store of their own (fusion_overrides).
QUICKSTART = ["experiment=quickstart", "data.features=images", "model.visual.freeze=none"]
# Tiny composition for tests: the same one as the test suite's, so a test session's data is reused.
TINY = [
    *QUICKSTART,
    *TINY_MODEL_OVERRIDES,
    *TINY_DATA_OVERRIDES,
    "callbacks.rich_progress_bar=null",
    "callbacks.rich_model_summary=null",
]
# The VQA v2 recipe as train.py runs it, with offline stand-ins of the same shapes: the synthetic
# set (VQA v2 layout) at the recipe's 448 px and random weights, as nothing can be downloaded on
# the GPU machine. The CSV logger alone: TensorBoard may be missing where the recipe is timed.
E2E_RECIPE = [
    "experiment=vqav2_resnet101_bert",
    "data=shapes",
    "data.image_size=448",
    "data.pin_memory=true",  # what data=vqav2 sets
    "model.visual.weights=null",
    "model/text=bert_base_random",
    "logger=csv",
]


def make_sizes(quick: bool) -> Sizes:
    if not quick:
        return Sizes(base_overrides=list(QUICKSTART))
    return Sizes(
        base_overrides=list(TINY),
        warmup=1,
        steps=2,
        overhead_warmup=1,
        overhead_steps=4,
        loader_batches=3,
        jpeg_images=16,
        jpeg_epochs=1,
        jpeg_passes=1,
        scale_batch=2,
        scale_channels=(16, 32),
        scale_text_dim=16,
        scale_hidden=16,
        grids=(2, 4),
        lengths=(4, 8),
        top_k=2,
        scale_warmup=0,
        gpu_overrides=[
            *TINY_MODEL_OVERRIDES,
            "model.visual.stages=[layer1]",  # the stem and layer1 only: the rows take seconds
            "data.image_size=32",
            "model.visual.channels_last=true",
            "trainer=gpu",
            "trainer.accelerator=cpu",
        ],
        gpu_batch=4,
        gpu_sweep=(2, 4, 8),
        gpu_grouped=(2, 2),
        gpu_length=6,
        gpu_vocab=100,
        gpu_answers=16,
        gpu_warmup=1,
        gpu_steps=2,
        graphs_warmup=1,
        e2e_overrides=list(TINY),
        e2e_seconds=120.0,
        e2e_steps=6,
        e2e_warmup=2,
    )


# What --gpu-smoke takes from the quick sizes when there is no CUDA.
GPU_SIZE_FIELDS = (
    "gpu_overrides",
    "gpu_batch",
    "gpu_sweep",
    "gpu_grouped",
    "gpu_length",
    "gpu_vocab",
    "gpu_answers",
    "gpu_warmup",
    "gpu_steps",
    "graphs_warmup",
    "e2e_overrides",
    "e2e_seconds",
    "e2e_steps",
    "e2e_warmup",
)


# ------------------------------------------------------------------------------- config


def compose_config(
    overrides: Sequence[str], workdir: Path, config_name: str = "train"
) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` as the CLI would, outputs under ``workdir``."""
    return compose_run_config(config_name, [*overrides, "extras.print_config=false"], workdir)


def describe(cfg: DictConfig) -> dict[str, Any]:
    """The composed settings a reader needs to know which quick-start was measured."""
    choices = cfg.hydra.runtime.choices
    return {
        "fusion": choices["fusion"],
        "fusion_hidden_dim": cfg.fusion.get("hidden_dim"),
        "visual": choices["model/visual"],
        "visual_stages": list(cfg.model.visual.stages),
        "visual_freeze": cfg.model.visual.freeze,
        "text": choices["model/text"],
        "image_size": cfg.data.image_size,
        "batch_size": cfg.data.batch_size,
        "group_by_image": cfg.data.group_by_image,
        "num_workers": cfg.data.num_workers,
        "precision": str(cfg.trainer.precision),
    }


def fusion_names(selected: Sequence[str] | None) -> list[str]:
    names = sorted(p.stem for p in CONFIG_DIR.glob("fusion/*.yaml"))
    if selected:
        if unknown := sorted(set(selected) - set(names)):
            raise SystemExit(f"unknown fusion(s) {unknown}; have {names}")
        names = [n for n in names if n in selected]
    return names


QUIET_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch")


@contextlib.contextmanager
def quieted() -> Iterator[None]:
    """:func:`quiet` for the block; a caller (a test session) gets its logging back."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    quiet()
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def quiet() -> None:
    """Lightning's per-fit INFO banner and the dependencies' known chatter would bury the tables."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_known_noise()


# ------------------------------------------------------------------------------- batches


def identity(batch: Any) -> Any:
    return batch


def in_memory_loader(batches: Sequence[VQABatch]) -> DataLoader:
    """Prepared batches served as they are (both loops draw the same one RNG value when they
    create its iterator, so their random streams stay aligned)."""
    return DataLoader(list(batches), batch_size=None, collate_fn=identity)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, VQABatch):
        return batch.to(device)
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def collect_batches(datamodule: pl.LightningDataModule, count: int) -> list[VQABatch]:
    """The first ``count`` training batches (epochs repeat when the split is smaller), with the
    datamodule's after-transfer cast applied (cached float16 maps -> float32)."""
    batches: list[VQABatch] = []
    while len(batches) < count:
        for batch in datamodule.train_dataloader():
            batches.append(datamodule.on_after_batch_transfer(batch, 0))
            if len(batches) == count:
                break
    return batches


def num_samples(batch: VQABatch) -> int:
    return batch.num_questions


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------- bare loop


def autocast_context(
    precision: str | int, device: torch.device
) -> contextlib.AbstractContextManager:
    """The autocast Lightning's precision plugin wraps ``training_step`` in."""
    precision = str(precision)
    if precision in ("32-true", "32"):
        return contextlib.nullcontext()
    if precision in ("bf16-mixed", "16-mixed"):
        # Lightning falls back to bf16 for 16-mixed on CPU, and disables the autocast cache.
        half = precision == "16-mixed" and device.type == "cuda"
        dtype = torch.float16 if half else torch.bfloat16
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)
    raise ValueError(f"the bare loop supports 32-true, bf16-mixed and 16-mixed, not {precision!r}")


def configure_optimization(
    module: VQALitModule, total_steps: int, optimizer_kwargs: dict[str, Any] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """What ``VQALitModule.configure_optimizers`` builds, for a run of ``total_steps`` steps:
    AdamW over the module's parameter groups (LR scaled per group), cosine with warm-up.
    ``optimizer_kwargs`` go to the configured optimizer (``fused=True``, ``foreach=True``)."""
    optimizer = module.optimizer_factory(
        params=module.parameter_groups(), **(optimizer_kwargs or {})
    )
    for group in optimizer.param_groups:
        group["lr"] *= group["lr_scale"]
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(module.hparams.warmup_fraction * total_steps),
        num_training_steps=total_steps,
        min_lr_rate=module.hparams.min_lr_ratio,
    )
    return optimizer, scheduler


class BareLoop:
    """One training step of ``VQALitModule`` under the Trainer, in plain PyTorch.

    Same order as Lightning's automatic optimisation: forward (modality dropout, model, loss)
    under the precision's autocast, zero_grad, backward, unscale (16-mixed), clip the norm of
    every optimised parameter's gradient, optimizer step, then the per-step LR schedule. No
    metrics or logging: that bookkeeping is what the overhead section charges to the framework.
    """

    def __init__(
        self,
        module: VQALitModule,
        total_steps: int,
        clip_val: float | None,
        precision: str | int,
        device: torch.device,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.module, self.device, self.precision = module, device, precision
        self.clip_val = clip_val
        self.optimizer, self.scheduler = configure_optimization(
            module, total_steps, optimizer_kwargs
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        half = str(precision) == "16-mixed" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if half else None

    def forward(self, batch: VQABatch) -> Tensor:
        module = self.module
        with autocast_context(self.precision, self.device):
            drop = module.sample_modality_dropout(batch.num_questions)
            out = module(batch, **drop)
            return module.compute_loss(out.logits, batch.targets)

    def backward(self, loss: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        return loss.detach()

    def forward_backward(self, batch: VQABatch) -> Tensor:
        return self.backward(self.forward(batch))

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_val:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_val)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    def step(self, batch: VQABatch) -> Tensor:
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return loss


def bare_fit(
    module: VQALitModule,
    batches: Sequence[VQABatch],
    *,
    clip_val: float | None,
    precision: str | int,
    device: torch.device,
) -> list[float]:
    """Train on every batch once; returns the start time of each step (after fetching it)."""
    module.to(device).train()
    loop = BareLoop(module, len(batches), clip_val, precision, device)
    starts = []
    with torch.enable_grad():
        for batch in in_memory_loader(batches):
            batch = to_device(batch, device)
            synchronize(device)
            starts.append(time.perf_counter())
            loop.step(batch)
    synchronize(device)
    starts.append(time.perf_counter())
    return starts


# ------------------------------------------------------------------------------- Lightning run


class StepTimer(pl.Callback):
    """Start time of every training batch (after Lightning fetched and transferred it).

    ``sync_at``: the batch indices before which the device is synchronised (None: all). A sync
    at every batch keeps the host from queueing the next step while the device runs this one,
    so a GPU rate is taken with syncs at the two ends of its window only.
    """

    def __init__(self, sync_at: Collection[int] | None = None) -> None:
        self.starts: list[float] = []
        self.sync_at = sync_at

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int
    ) -> None:
        if self.sync_at is None or len(self.starts) in self.sync_at:
            synchronize(pl_module.device)
        self.starts.append(time.perf_counter())


def lightning_fit(
    cfg: DictConfig,
    module: VQALitModule,
    batches: Sequence[VQABatch],
    workdir: Path,
    *,
    user_callbacks: bool = True,
    extra_callbacks: Sequence[pl.Callback] = (),
    sync_at: Collection[int] | None = None,
) -> tuple[list[float], pl.Trainer]:
    """``trainer.fit`` on exactly ``batches``, built from the project's trainer config.

    ``user_callbacks``: the run's callbacks and logger as configured (checkpointing, LR monitor,
    progress bar, model summary, CSV logger); otherwise none of them. Always: no validation
    (``limit_val_batches=0``, no sanity check) and ``max_steps=len(batches)``, because the bare
    loop neither validates nor runs past the batches. ``extra_callbacks`` are added either way.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(workdir)
    timer = StepTimer(sync_at)
    loggers = instantiate_loggers(cfg.get("logger")) if user_callbacks else []
    configured = instantiate_callbacks(cfg.get("callbacks")) if user_callbacks else []
    callbacks = [*drop_logger_only_callbacks(configured, loggers), timer, *extra_callbacks]
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        max_steps=len(batches),
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=user_callbacks,
        enable_progress_bar=user_callbacks,
        enable_model_summary=user_callbacks,
        default_root_dir=str(workdir),
    )
    # Progress bar and model summary to stderr: stdout carries the benchmark's tables.
    with contextlib.redirect_stdout(sys.stderr):
        trainer.fit(module, train_dataloaders=in_memory_loader(batches))
    for lg in loggers:
        lg.finalize("success")
    return timer.starts, trainer


def steady_rate(starts: Sequence[float], batches: Sequence[VQABatch], warmup: int) -> dict:
    """Samples/s from the start of batch ``warmup`` to the start of the last batch.

    Start-to-start periods hold everything a loop does per step (fetch, transfer, hooks,
    logging, step); the last batch is left out because a fit's end (checkpoint, logger
    flush) is a one-off, not a per-step cost.
    """
    last = len(batches) - 1
    if last <= warmup or len(starts) < last + 1:
        raise ValueError(f"need more than {warmup + 1} batches with timestamps to time")
    seconds = starts[last] - starts[warmup]
    samples = sum(num_samples(b) for b in batches[warmup:last])
    return {
        "samples": samples,
        "steps": last - warmup,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
    }


# ------------------------------------------------------------------------------- memory


class TensorMemoryTracker(TorchDispatchMode):
    """Peak total size of live tensor storages while active.

    ``existing`` tensors (parameters, optimizer state, the batch) count from the start and until
    they are freed; every storage an op creates counts until it is freed (weakref finalizer on
    the storage, whose Python object lives exactly as long as the storage). Views and in-place
    results add nothing. Works on any device; what allocators keep cached is not counted.
    """

    def __init__(self, existing: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.finalizers: list[weakref.finalize] = []
        self.live = 0
        self.peak = 0
        for tensor in existing:
            self._track(tensor)
        self.start = self.live

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def _track(self, tensor: Any) -> None:
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / opaque tensors have none
            return
        if storage in self.sizes:
            return
        nbytes = storage.nbytes()
        self.sizes[storage] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.finalizers.append(weakref.finalize(storage, self._release, nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self._track(tensor)
        return out

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for finalizer in self.finalizers:  # parameters outlive the tracker: let it go
            finalizer.detach()
        self.finalizers.clear()

    @property
    def increase(self) -> int:
        """Peak above what was live at the start (activations, gradients, temporaries)."""
        return self.peak - self.start


def state_tensors(*objects: Any) -> list[Tensor]:
    """Every tensor held by modules (parameters, gradients, buffers), optimizers (state) and
    nested batch containers."""
    found: list[Tensor] = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                found.append(p)
                if p.grad is not None:
                    found.append(p.grad)
            found.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            found.extend(t for s in obj.state.values() for t in tree_leaves(s))
        else:
            found.extend(t for t in tree_leaves(obj) if isinstance(t, Tensor))
    return found


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def rss_mib(pid: int | str = "self") -> float:
    """Current resident set size of process ``pid`` (Linux), MiB."""
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def own_cpu_seconds() -> float:
    """CPU time of this process and its reaped children (loader and extraction workers)."""
    return sum(
        u.ru_utime + u.ru_stime
        for u in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def machine_busy_seconds() -> float | None:
    """CPU-seconds all processes on the machine have used since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


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
    configuration's memory or threads leak into the next, and each skips ~20 s of imports."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "pytorch_lightning", "transformers", "vqa.train"])
    return ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1)


def run_specs(specs: list[dict[str, Any]], isolate: bool) -> list[dict[str, Any]]:
    if not isolate:
        return [measure_training(spec) for spec in specs]
    with _forkserver_pool() as pool:
        return [
            pool.submit(measure_training, {**spec, "isolated": True}).result() for spec in specs
        ]


def build_feature_store(sizes: Sizes, workdir: Path, threads: int) -> dict[str, Any]:
    """The frozen encoder's training-split store, written by the project's extractor."""
    from scripts.extract_features import extract

    feature_dir = workdir / "features"
    cfg = compose_config(
        [
            *sizes.base_overrides,
            "model.visual.freeze=all",
            f"data.feature_dir={feature_dir}",
            "extract.splits=[${data.train_split}]",
            "extract.progress=false",
            "extract.device=cpu",
        ],
        workdir / "extract",
        config_name="extract_features",
    )
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(sys.stderr):  # its rich table: keep stdout for ours
        (report,) = extract(cfg)
    return {
        "feature_dir": str(feature_dir),
        "images": report.num_images,
        "extract_images_per_s": report.images_per_second,
        "kib_per_image": report.bytes_per_image / 1024,
    }


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


# ------------------------------------------------------------------------------- section 3


def loader_rate(overrides: Sequence[str], batches: int, workdir: Path) -> dict[str, Any]:
    """Samples/s of the training loader alone (worker start-up reported apart)."""
    cfg = compose_config(overrides, workdir)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    begin = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter()
    samples = 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        batch = datamodule.on_after_batch_transfer(batch, 0)
        samples += num_samples(batch)
    seconds = time.perf_counter() - first
    del iterator, loader
    gc.collect()
    return {
        "num_workers": int(cfg.data.num_workers),
        "startup_s": first - begin,
        "samples_per_s": samples / seconds,
    }


# Most COCO images are 640 px on the long side, 640x480 the commonest; VQA v2 asks 443,757
# training questions about its 82,783 train2014 images.
COCO_SIZE = (640, 480)
COCO_JPEG_QUALITY = 90
VQA_V2_QUESTIONS_PER_IMAGE = 5.4
# Issue 19's goal for the 448 px recipe on a 16-core GPU host.
LOADER_GOAL_QUESTIONS_PER_S = 3000.0
TARGET_WORKERS = 16
# The VQA v2 recipe's data side as train.py composes it; the model choices only matter for what
# the data config reads from them (the tokenizer: null builds WordPiece from the questions, as
# bert-base-uncased cannot be downloaded here). No CUDA to pin for, and the synthetic answers are
# too few for the recipe's count threshold (the vocabulary size barely touches the loader).
JPEG_RECIPE = [
    "experiment=vqav2_resnet101_bert",
    "model/text=bert_base_random",
    "model.visual.weights=null",
    "logger=none",
    "data.pin_memory=false",
    "data.min_answer_count=1",
]


def photo_like_jpeg(rng: np.random.Generator, size: tuple[int, int] = COCO_SIZE) -> bytes:
    """A JPEG about as many bytes as a COCO photo: the entropy decoder's cost follows the
    compressed size, so flat colour or clean shapes would understate the decode."""
    width, height = size
    # Smooth lighting, then hard-edged objects, then texture at two scales (surfaces, sensor
    # noise on the luma, as a camera leaves it).
    image = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 20))):
        x0, y0 = rng.uniform(-100, width), rng.uniform(-100, height)
        x1, y1 = x0 + rng.uniform(20, 300), y0 + rng.uniform(20, 300)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            corners = rng.uniform((x0, y0), (x1, y1), size=(int(rng.integers(3, 7)), 2))
            draw.polygon([(float(x), float(y)) for x, y in corners], fill=fill)
    surface = rng.normal(0, 28, (height // 2, width // 2)).astype(np.float32)
    surface = np.asarray(Image.fromarray(surface, mode="F").resize(size, Image.Resampling.BILINEAR))
    grain = rng.normal(0, 14, (height, width)).astype(np.float32)
    pixels = np.asarray(image, dtype=np.float32) + (surface + grain)[..., None]
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
        out, format="JPEG", quality=COCO_JPEG_QUALITY
    )
    return out.getvalue()


def build_jpeg_set(root: Path, images: int, questions_per_image: int) -> dict[str, Any]:
    """The synthetic set's VQA v2 files (questions, annotations, layout) with every training
    image replaced by a COCO-sized photo-like JPEG; the few validation images only have to exist
    for the answer vocabulary."""
    generate(
        root,
        ShapesConfig(
            num_train_images=images,
            num_val_images=2,
            num_test_images=0,
            questions_per_image=questions_per_image,
            image_size=32,
            seed=0,
        ),
    )
    rng = np.random.default_rng(0)
    paths = sorted((root / "Images" / "mscoco" / "train2014").glob("*.jpg"))
    sizes = []
    for path in paths:
        data = photo_like_jpeg(rng)
        path.write_bytes(data)
        sizes.append(len(data))
    return {
        "images": len(paths),
        "width": COCO_SIZE[0],
        "height": COCO_SIZE[1],
        "jpeg_quality": COCO_JPEG_QUALITY,
        "jpeg_kib_mean": statistics.fmean(sizes) / 1024,
    }


def jpeg_loader_rate(overrides: Sequence[str], epochs: int, workdir: Path) -> dict[str, Any]:
    """Questions/s and images/s of the training loader over whole epochs after an untimed one.

    Whole epochs with persistent workers: each timed epoch starts with every worker idle and
    ends when its last batch is out, so no work done before the clock started is counted in
    it (timing from a batch in mid-epoch would credit the batches the workers had prefetched).
    The idle tail of a worker at each epoch's end counts against the rate, so epochs of a few
    batches understate it rather than overstate it.
    """
    cfg = compose_config(overrides, workdir)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    begin = time.perf_counter()
    first = None
    for _ in loader:  # worker start-up, imports in the workers, the page cache
        first = first or time.perf_counter()
    questions = images = batches = 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            questions += num_samples(batch)
            images += int(batch.images.shape[0])
            batches += 1
    seconds = time.perf_counter() - start
    workers = int(cfg.data.num_workers)
    result = {
        "num_workers": workers,
        "startup_s": (first or start) - begin,
        "epochs": epochs,
        "batches": batches,
        "questions": questions,
        "images": images,
        "seconds": seconds,
        "questions_per_s": questions / seconds,
        "images_per_s": images / seconds,
        "images_per_s_per_worker": images / seconds / max(workers, 1),
    }
    del loader
    gc.collect()
    return result


def _stage_ms(
    stages: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]], passes: int
) -> dict[str, float]:
    """ms per item of each stage's function over its items, median over ``passes`` passes.

    The stages take turns within each pass, so a burst of load from another process lands on
    one pass of every stage rather than on every pass of one stage.
    """
    means: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(passes):
        for name, (fn, items) in stages.items():
            begin = time.perf_counter()
            for item in items:
                fn(item)
            means[name].append((time.perf_counter() - begin) * 1000 / len(items))
    return {name: statistics.median(values) for name, values in means.items()}


def image_stage_costs(dataset: VQADataset, passes: int) -> dict[str, float]:
    """ms per image of what a loader worker does for each distinct image, whole and by stage,
    on one thread as in a worker (DataLoader sets one torch thread there), and the CPU decode
    of torchvision (the one ``decode_jpeg(device="cuda")`` would replace) on the same bytes."""
    transform = dataset.transform
    ops = list(getattr(transform, "transforms", []))
    if not ops or not isinstance(ops[0], v2.Resize):
        raise ValueError(f"expected the training transform to start with a Resize, got {ops}")
    resize, finish = ops[0], v2.Compose(ops[1:])
    table = dataset.table.select_columns(["image_id", "image_path", "question_id"])
    rows = list({row["image_id"]: row for row in table}.values())
    paths = [Path(row["image_path"]) for row in rows]
    encoded = [path.read_bytes() for path in paths]
    buffers = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    decoded = [load_rgb(data) for data in encoded]
    resized = [resize(image) for image in decoded]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _stage_ms(
            {
                "dataset_image": (lambda row: transform(row_image(row)), rows),
                "read_file": (Path.read_bytes, paths),
                "pil_decode": (load_rgb, encoded),
                "resize": (resize, decoded),
                "to_tensor_normalise": (finish, resized),
                "torchvision_decode_cpu": (decode_jpeg, buffers),
            },
            passes,
        )
    finally:
        torch.set_num_threads(threads)


def batch_ms_per_image(loader: DataLoader, passes: int) -> float:
    """ms per decoded image of what a worker does for a whole batch (table rows, images,
    collate), in-process on one thread: the part of the loader's cost before the batch crosses
    to the main process. Median over ``passes`` epochs."""
    dataset = loader.dataset
    index_batches = [list(indices) for indices in loader.batch_sampler]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        means = []
        for _ in range(passes):
            images = 0
            begin = time.perf_counter()
            for indices in index_batches:
                images += int(loader.collate_fn(dataset.__getitems__(indices)).images.shape[0])
            means.append((time.perf_counter() - begin) * 1000 / images)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(means)


def extrapolate(per_worker_images_per_s: float, workers: int) -> float:
    """Questions/s of ``workers`` loader workers if each kept the measured rate: not measured."""
    return per_worker_images_per_s * workers * VQA_V2_QUESTIONS_PER_IMAGE


def jpeg_pipeline(ctx: Context) -> dict[str, Any]:
    """The VQA v2 recipe's train loader on COCO-sized JPEGs, and where a worker's time goes."""
    sizes = ctx.sizes
    workdir = ctx.workdir / "jpeg"
    root = workdir / "vqa"
    data_set = build_jpeg_set(root, sizes.jpeg_images, sizes.jpeg_questions_per_image)
    base = [*JPEG_RECIPE, f"data.root={root}", f"paths.data_dir={workdir / 'data'}"]
    rows = [
        jpeg_loader_rate(
            [*base, f"data.num_workers={workers}"], sizes.jpeg_epochs, workdir / f"w{workers}"
        )
        for workers in sizes.jpeg_workers
    ]
    cfg = compose_config(base, workdir / "stages")
    recipe_workers = int(cfg.data.num_workers)
    cfg.data.num_workers = 0  # the stages run here: a loader with the recipe's workers only warns
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    stages = image_stage_costs(datamodule.datasets[cfg.data.train_split], sizes.jpeg_passes)
    stages["batch_in_process"] = batch_ms_per_image(
        datamodule.train_dataloader(), sizes.jpeg_passes
    )
    one = next((r for r in rows if r["num_workers"] == 1), rows[0])
    per_worker = one["images_per_s_per_worker"]
    for r in rows:
        r["per_worker_vs_one_worker"] = r["images_per_s_per_worker"] / per_worker
    headline = extrapolate(per_worker, TARGET_WORKERS)
    slowest = min(rows, key=lambda r: r["images_per_s_per_worker"])
    return {
        "config": " ".join([*JPEG_RECIPE, "data.root=<generated>", "data.num_workers=N"]),
        "image_size": int(cfg.data.image_size),
        "batch_size": int(cfg.data.batch_size),
        "group_by_image": bool(cfg.data.group_by_image),
        "data_set": {**data_set, "questions": len(datamodule.datasets[cfg.data.train_split])},
        "rows": rows,
        "stages_ms": stages,
        "in_process_images_per_s": 1000 / stages["dataset_image"],
        "one_worker_ms_per_image": 1000 / per_worker,
        "extrapolation": {
            "basis": f"the {one['num_workers']}-worker loader row",
            "per_worker_images_per_s": per_worker,
            "workers": TARGET_WORKERS,
            "questions_per_image": VQA_V2_QUESTIONS_PER_IMAGE,
            "questions_per_s": headline,
            "goal_questions_per_s": LOADER_GOAL_QUESTIONS_PER_S,
            "clears_goal": headline >= LOADER_GOAL_QUESTIONS_PER_S,
            "recipe_workers": recipe_workers,
            "recipe_workers_questions_per_s": extrapolate(per_worker, recipe_workers),
            # Workers sharing the cores with the main process and each other lose some of the
            # one-worker rate: the slowest row's per-worker rate shows how much that costs.
            "slowest_row_workers": slowest["num_workers"],
            "slowest_row_questions_per_s": extrapolate(
                slowest["images_per_s_per_worker"], TARGET_WORKERS
            ),
            # An image whose questions straddle two batches is decoded for each: the
            # measured questions per decode is below the questions per image.
            "measured_questions_per_decode": one["questions"] / one["images"],
            "from_row_questions_per_s": one["questions_per_s"]
            / max(one["num_workers"], 1)
            * TARGET_WORKERS,
            "in_process_questions_per_s": extrapolate(
                1000 / stages["dataset_image"], TARGET_WORKERS
            ),
            "assumes": "every worker keeps the rate measured for one worker with a core to "
            "itself (linear scaling); 16 workers on 16 cores leave none for the training "
            "process and its pin-memory thread; images come from the page cache; an image "
            "is decoded once per batch that holds its questions, so x 5.4 overstates the "
            "questions per decode a little (the questions/s of the row itself does not)",
        },
        "note": f"Questions/s and images/s (decoded images: one per image and batch) over "
        f"{sizes.jpeg_epochs} whole epoch(s) after an untimed one (persistent workers: each "
        "timed epoch starts with the workers idle); pin_memory off (no CUDA here); stage "
        "costs in-process on one torch thread, as in a worker: ms per image, median of "
        f"{sizes.jpeg_passes} pass(es) over the images",
    }


def section_pipeline(ctx: Context, fusion_rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Loader rate vs the training step's consumption rate, images and cached."""
    sizes = ctx.sizes
    fusion = ctx.default_fusion
    store = ctx.feature_store()
    model = {r["path"]: r for r in fusion_rows or [] if r["fusion"] == fusion}
    model_runs = []
    if len(model) < 2:  # the fusions section did not run this fusion: measure it here
        specs = [
            ctx.spec(fusion_overrides(sizes, fusion, p, store["feature_dir"]))
            for p in ("images", "cached")
        ]
        model_runs = run_specs(specs, ctx.isolate)
        model = dict(zip(("images", "cached"), model_runs, strict=True))
    rows = []
    for path in ("images", "cached"):
        overrides = [
            o
            for o in fusion_overrides(sizes, fusion, path, store["feature_dir"])
            if not o.startswith("data.num_workers")
        ]
        loader = loader_rate(overrides, sizes.loader_batches, ctx.workdir / f"loader-{path}")
        rate = model[path]["samples_per_s"]
        rows.append(
            {
                "path": path,
                "num_workers": loader["num_workers"],
                "loader_startup_s": loader["startup_s"],
                "loader_samples_per_s": loader["samples_per_s"],
                "model_samples_per_s": rate,
                "ratio": loader["samples_per_s"] / rate,
            }
        )
    return {
        "fusion": fusion,
        "goal_ratio": 3.0,
        "note": "loader alone (its num_workers from the config, main process idle) vs training "
        "steps with batches already in memory (section fusions); ratio = loader / model",
        "rows": rows,
        "model_runs": model_runs,
        "jpeg": jpeg_pipeline(ctx),
    }


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


# ------------------------------------------------------------------------------- section 5


CPU_SDPA_FLOPS = {
    # The CPU fused attention kernels are not in torch's flop registry; they do the same math.
    # (__wrapped__: the raw formulas; FlopCounterMode adds its own shape wrapper.)
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        sdpa_backward_flop.__wrapped__
    ),
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmul/conv/attention kernels ``fn`` runs (its backward included)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)
    with counter:
        fn()
    return counter.get_total_flops()


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def synthetic_batches(
    sizes: Sizes,
    images: int,
    per_image: int,
    image_size: int,
    device: torch.device,
    channels_last: bool,
    count: int = 2,
) -> list[VQABatch]:
    """Random in-memory VQA batches of the real shapes, ``images`` distinct images with
    ``per_image`` questions each (image-grouped, as the collator makes them): the GPU figures then
    measure the model, not JPEG decoding on this machine's CPUs (the e2e row measures that)."""
    gen = torch.Generator().manual_seed(0)
    b, n = images * per_image, sizes.gpu_length
    batches = []
    for _ in range(count):
        pixels = torch.randn(images, 3, image_size, image_size, generator=gen)
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        lengths = torch.randint(4, n + 1, (b,), generator=gen)
        mask = (torch.arange(n) < lengths[:, None]).long()
        low = 1000 if sizes.gpu_vocab > 2000 else 1  # past BERT's [unused]/special ids
        input_ids = torch.randint(low, sizes.gpu_vocab, (b, n), generator=gen) * mask
        targets = torch.zeros(b, sizes.gpu_answers)
        targets[torch.arange(b), torch.randint(0, sizes.gpu_answers, (b,), generator=gen)] = 1.0
        batch = VQABatch(
            images=pixels,
            image_index=torch.arange(b) // per_image,
            input_ids=input_ids,
            attention_mask=mask,
            targets=targets,
            question_id=torch.arange(b),
            image_id=torch.arange(b) // per_image,
            answer_type_id=torch.full((b,), ANSWER_TYPES.index("other")),
            question=("what is it",) * b,
            answers=(("a0",) * 10,) * b,
            answer_type=("other",) * b,
            question_type=("what",) * b,
        )
        batches.append(to_device(batch, device))
    return batches


def time_steps(
    step: Callable[[int], Any], warmup: int, steps: int, device: torch.device
) -> tuple[float, float | None]:
    """Seconds per step over ``steps`` calls after ``warmup`` untimed ones, and on CUDA the peak
    allocated MiB. The device is synchronised at the two ends only: within the window the host
    queues ahead as a training loop does."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    synchronize(device)
    seconds = (time.perf_counter() - begin) / steps
    memory = mib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return seconds, memory


def rate_row(
    kind: str,
    label: str,
    *,
    images: float,
    questions: float | None,
    seconds: float,
    flops: int | None,
    peak: float | None,
    memory: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """One timed row of the gpu section: per-step sizes, rates, achieved FLOP/s and MFU."""
    flops_per_s = None if flops is None else flops / seconds
    return {
        "row": kind,
        "label": label,
        "images": images,
        "questions": questions,
        "step_ms": 1000 * seconds,
        "questions_per_s": None if questions is None else questions / seconds,
        "images_per_s": images / seconds,
        "flops_per_step": flops,
        "achieved_tflops": None if flops_per_s is None else flops_per_s / 1e12,
        "mfu": None if flops_per_s is None or peak is None else flops_per_s / peak,
        "peak_memory_mib": memory,
        **extra,
    }


def optimizer_label(optimizer: torch.optim.Optimizer) -> str:
    group = optimizer.param_groups[0]
    if group.get("fused"):
        impl = "fused"
    elif group.get("foreach") is not None:
        impl = "foreach" if group["foreach"] else "for-loop"
    else:  # torch's default: foreach when every parameter is on CUDA
        on_cuda = all(p.is_cuda for g in optimizer.param_groups for p in g["params"])
        impl = f"default = {'foreach' if on_cuda else 'for-loop'}"
    return f"{type(optimizer).__name__} ({impl})"


GPU_ROW_TITLES = {
    "sweep": "bare step, N images x 1 question",
    "grouped": "bare step, image-grouped questions",
    "optimizer": "bare step, AdamW foreach vs fused",
    "lightning": "Lightning Trainer vs bare loop",
    "anchor": "torchvision ResNet alone",
    "e2e": "train.py end to end",
    "graphs": "eager vs torch.compile(mode='reduce-overhead')",
}
GRAPHS_NOTE = (
    "torch.compile(mode='reduce-overhead') of the network (forward and backward captured as CUDA "
    "graphs by cudagraph trees; loss and optimizer eager, both rows AdamW fused). "
    "torch.cuda.graphs (make_graphed_callables, or capturing the whole step with a capturable "
    "optimizer) is the alternative without a compiler; it needs static shapes and no host syncs "
    "in what it captures"
)


class GpuBench:
    """What the gpu section's rows share: one model on the device (built on first use: the e2e
    row alone needs none), its config, batches and the FLOP count of each batch shape."""

    def __init__(self, ctx: Context, device: torch.device, overrides: list[str]) -> None:
        self.ctx, self.sizes, self.device = ctx, ctx.sizes, device
        self.cfg = compose_config(overrides, ctx.workdir / "gpu")
        self.precision = str(self.cfg.trainer.precision)
        self.image_size = int(self.cfg.data.image_size)
        self.channels_last = bool(self.cfg.model.visual.channels_last)
        self.device_name, self.peak = peak_flops(device)
        self._module: VQALitModule | None = None
        self._batches: dict[tuple[int, int], list[VQABatch]] = {}
        self.flops: dict[tuple[int, int], int] = {}

    @property
    def module(self) -> VQALitModule:
        if self._module is None:
            sizes = self.sizes
            pl.seed_everything(self.cfg.seed, verbose=False)
            net = instantiate(
                self.cfg.model, num_answers=sizes.gpu_answers, vocab_size=sizes.gpu_vocab
            )
            self._module = instantiate(self.cfg.module)(
                net=net,
                answer_vocab=[f"a{i}" for i in range(sizes.gpu_answers)],
                question_types=["what"],
            )
        return self._module

    def batches(self, images: int, per_image: int) -> list[VQABatch]:
        key = (images, per_image)
        if key not in self._batches:
            self._batches[key] = synthetic_batches(
                self.sizes, images, per_image, self.image_size, self.device, self.channels_last
            )
        return self._batches[key]

    def loop(self, optimizer_kwargs: dict[str, Any] | None = None) -> BareLoop:
        # A Lightning fit's teardown leaves the module on the CPU: every row moves it back.
        self.module.to(self.device).train()
        sizes = self.sizes
        total = sizes.gpu_warmup + sizes.graphs_warmup + sizes.gpu_steps + 2
        return BareLoop(
            self.module,
            total,
            self.cfg.trainer.gradient_clip_val,
            self.precision,
            self.device,
            optimizer_kwargs,
        )

    def flops_of(self, images: int, per_image: int) -> int:
        """Counted once per batch shape, eagerly (FlopCounterMode does not see inside compiled
        graphs, and the optimizer is not counted)."""
        key = (images, per_image)
        if key not in self.flops:
            loop = self.loop()
            self.flops[key] = count_flops(
                functools.partial(loop.forward_backward, self.batches(images, per_image)[0])
            )
            self.release(loop)
        return self.flops[key]

    def release(self, *objects: Any) -> None:
        """Gradients and optimizer state of one row must not count in the next row's memory."""
        del objects
        if self._module is not None:
            self._module.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def bare_row(
        self,
        kind: str,
        images: int,
        per_image: int,
        optimizer_kwargs: dict[str, Any] | None = None,
        count_step_ops: bool = False,
    ) -> dict[str, Any]:
        """Bare training steps on synthetic batches of ``images`` x ``per_image`` questions."""
        sizes = self.sizes
        flops = self.flops_of(images, per_image)
        loop = self.loop(optimizer_kwargs)
        batches = self.batches(images, per_image)
        seconds, memory = time_steps(
            lambda i: loop.step(batches[i % len(batches)]),
            sizes.gpu_warmup,
            sizes.gpu_steps,
            self.device,
        )
        optimizer = optimizer_label(loop.optimizer)
        extra: dict[str, Any] = {"loop": "bare", "optimizer": optimizer}
        if count_step_ops:  # one more step, under the op counter (after the timed ones)
            extra["ops"] = ops_summary(count_bare_step(loop, batches[0]))
        self.release(loop)
        return rate_row(
            kind,
            f"{images} images x {per_image} question{'s' if per_image > 1 else ''}, {optimizer}",
            images=images,
            questions=images * per_image,
            seconds=seconds,
            flops=flops,
            peak=self.peak,
            memory=memory,
            **extra,
        )

    def lightning_row(self) -> dict[str, Any]:
        """The module under the project's GPU trainer config (callbacks, logger and progress bar
        off), on the same synthetic batches as the bare rows."""
        sizes, n = self.sizes, self.sizes.gpu_batch
        flops = self.flops_of(n, 1)
        batches = self.batches(n, 1)
        stream = [batches[i % len(batches)] for i in range(sizes.gpu_warmup + sizes.gpu_steps + 1)]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        cfg = copy.deepcopy(self.cfg)
        starts, _ = lightning_fit(
            cfg,
            self.module,
            stream,
            self.ctx.workdir / "gpu/lightning",
            user_callbacks=False,
            sync_at={sizes.gpu_warmup, len(stream) - 1},
        )
        rate = steady_rate(starts, stream, sizes.gpu_warmup)
        memory = (
            mib(torch.cuda.max_memory_allocated(self.device))
            if self.device.type == "cuda"
            else None
        )
        self.release()
        return rate_row(
            "lightning",
            f"{n} images x 1 question, Lightning Trainer (configured optimizer)",
            images=n,
            questions=n,
            seconds=rate["seconds"] / rate["steps"],
            flops=flops,
            peak=self.peak,
            memory=memory,
            loop="lightning",
        )

    def anchor_row(self) -> dict[str, Any]:
        """torchvision's ResNet of the model's depth alone, trained as an image classifier at the
        same precision, layout and image size: what the visual encoder costs without VQA."""
        sizes, device, n = self.sizes, self.device, self.sizes.gpu_batch
        arch = str(self.cfg.model.visual.arch)
        torch.manual_seed(0)
        net = torchvision.models.get_model(arch, weights=None).to(device).train()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        net = net.to(memory_format=memory_format)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(n, 3, self.image_size, self.image_size, generator=gen)
        pixels = pixels.to(device).contiguous(memory_format=memory_format)
        labels = torch.randint(0, 1000, (n,), generator=gen).to(device)

        def forward_backward() -> None:
            with autocast_context(self.precision, device):
                loss = F.cross_entropy(net(pixels), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

        def step(_: int) -> None:
            forward_backward()
            optimizer.step()

        flops = count_flops(forward_backward)
        optimizer.zero_grad(set_to_none=True)
        seconds, memory = time_steps(step, sizes.gpu_warmup, sizes.gpu_steps, device)
        self.release(net, optimizer)
        return rate_row(
            "anchor",
            f"torchvision {arch} alone, {n} images, 1000 classes, {optimizer_label(optimizer)}",
            images=n,
            questions=None,
            seconds=seconds,
            flops=flops,
            peak=self.peak,
            memory=memory,
            loop="bare",
        )

    def graphs_row(self) -> dict[str, Any]:
        """The network under torch.compile(mode="reduce-overhead"), the rest of the bare step
        eager; the first step's wall time is the compilation."""
        from torch._dynamo.utils import counters

        sizes, device, n = self.sizes, self.device, self.sizes.gpu_batch
        flops = self.flops_of(n, 1)  # the eager count: the compiled graphs compute the same
        batches = self.batches(n, 1)
        loop = self.loop({"fused": True})
        net = self.module.net
        counters.clear()
        self.module.net = torch.compile(net, mode="reduce-overhead")
        try:

            def step(i: int) -> None:
                # a new iteration for cudagraph trees: the previous step's outputs are dead
                torch.compiler.cudagraph_mark_step_begin()
                loop.step(batches[i % len(batches)])

            begin = time.perf_counter()
            step(0)
            synchronize(device)
            first_step_s = time.perf_counter() - begin
            seconds, memory = time_steps(
                step, sizes.graphs_warmup + sizes.gpu_warmup, sizes.gpu_steps, device
            )
        finally:
            self.module.net = net
        breaks = counters["graph_break"]
        compiled = {
            "compile_first_step_s": first_step_s,
            "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": [reason[:300] for reason, _ in breaks.most_common(5)],
            "unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        }
        compiled["cuda_graphs"] = device.type == "cuda" and compiled["cudagraph_skips"] == 0
        label = f"{n} images x 1 question, {optimizer_label(loop.optimizer)}, compiled"
        self.release(loop)
        torch._dynamo.reset()
        return rate_row(
            "graphs",
            label,
            images=n,
            questions=n,
            seconds=seconds,
            flops=flops,
            peak=self.peak,
            memory=memory,
            loop="bare",
            compile="reduce-overhead",
            **compiled,
        )


def lightning_max_time(seconds: float) -> str:
    """Lightning's DD:HH:MM:SS."""
    minutes, secs = divmod(max(1, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


class StepLog(pl.Callback):
    """Wall-clock start and size of every training batch, written to ``path`` (JSON) when the
    fit ends: the e2e row adds it to a ``train.py`` run through the callbacks config.

    No device sync per step: the recipe's own step is timed as it runs, and over a window of
    many steps the few the host may have queued ahead are within the error.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.record: dict[str, list] = {"starts": [], "questions": [], "images": [], "epochs": []}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["starts"].append(time.time())
        self.record["questions"].append(batch.num_questions)
        self.record["images"].append(batch.num_images)
        self.record["epochs"].append(trainer.current_epoch)

    def _write(self, pl_module: Any) -> None:
        device = pl_module.device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        self.record["peak_memory_mib"] = mib(peak)
        self.record["device"] = torch.cuda.get_device_name(device) if peak is not None else "cpu"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record))

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._write(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._write(pl_module)


# What the e2e row adds to the recipe: train for the time given, nothing else timed in between.
E2E_RUN_OVERRIDES = [
    "test=false",
    "extras.print_config=false",
    "trainer.max_epochs=1000",
    "trainer.min_epochs=null",  # max_time may end the fit inside the first epoch
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
]


def e2e_row(ctx: Context, peak: float | None) -> dict[str, Any]:
    """``python train.py <recipe>`` in a fresh process: questions/s from the start times of its
    training batches after warm-up (loader, transfer, Lightning and the step, all included)."""
    sizes = ctx.sizes
    out = (ctx.e2e_dir or ctx.workdir / "e2e").resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps_file, log_file = out / "steps.json", out / "train.log"
    steps_file.unlink(missing_ok=True)
    seconds = ctx.e2e_seconds or sizes.e2e_seconds
    overrides = [
        *sizes.e2e_overrides,
        *E2E_RUN_OVERRIDES,
        f'trainer.max_time="{lightning_max_time(seconds)}"',
        f"trainer.max_steps={sizes.e2e_steps}",
        f"paths.output_dir={out / 'run'}",
    ]
    hook = [
        "+callbacks.bench_step_log._target_=scripts.benchmark.StepLog",
        f"+callbacks.bench_step_log.path={steps_file}",
    ]
    command = [sys.executable, "train.py", *overrides, *hook]
    env = dict(os.environ)
    if ctx.device.type != "cuda":
        env["OMP_NUM_THREADS"] = str(ctx.threads)
    row: dict[str, Any] = {
        "row": "e2e",
        "label": e2e_label(sizes.e2e_overrides),
        "command": shlex.join(command),
        "run_dir": str(out / "run"),
        "composition": describe(compose_config(overrides, ctx.workdir / "e2e-cfg")),
    }
    launched = time.time()
    try:
        with open(log_file, "w") as log_fh:
            proc = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                timeout=seconds + 900,  # start-up (data, tokenizer, model) comes on top
                check=False,
            )
    except subprocess.TimeoutExpired:
        return {**row, "error": "train.py did not finish in time", "log_tail": _tail(log_file)}
    row["wall_s"] = time.time() - launched
    row["returncode"] = proc.returncode
    if proc.returncode != 0 or not steps_file.is_file():
        return {
            **row,
            "error": f"train.py exited with {proc.returncode}",
            "log_tail": _tail(log_file),
        }
    record = json.loads(steps_file.read_text())
    starts = record["starts"]
    warm, last = sizes.e2e_warmup, len(starts) - 1
    if last <= warm:
        return {
            **row,
            "error": f"{len(starts)} training steps in {seconds:.0f} s: need more than {warm + 1}",
            "log_tail": _tail(log_file),
        }
    steps = last - warm
    periods = sorted(
        b - a for a, b in zip(starts[warm:last], starts[warm + 1 : last + 1], strict=True)
    )
    checkpoint = out / "run" / "checkpoints" / "last.ckpt"
    return rate_row(
        "e2e",
        row["label"],
        images=sum(record["images"][warm:last]) / steps,
        questions=sum(record["questions"][warm:last]) / steps,
        seconds=(starts[last] - starts[warm]) / steps,
        flops=None,
        peak=peak,
        memory=record.get("peak_memory_mib"),
        loop="train.py",
        **{k: v for k, v in row.items() if k not in ("row", "label")},
        steps_run=len(starts),
        steps_timed=steps,
        warmup_steps=warm,
        epochs=record["epochs"][-1] + 1,
        startup_s=starts[0] - launched,
        period_ms={
            "median": 1000 * statistics.median(periods),
            "p90": 1000 * periods[int(0.9 * (len(periods) - 1))],
            "max": 1000 * periods[-1],
        },
        checkpoint=str(checkpoint) if checkpoint.is_file() else None,
    )


def e2e_label(overrides: Sequence[str]) -> str:
    shown = [o for o in overrides if not o.startswith("paths.")]
    return "train.py " + " ".join(shown if len(shown) <= 8 else [*shown[:3], "..."])


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def gpu_summary(rows: list[dict[str, Any]], sizes: Sizes) -> dict[str, Any]:
    """The comparisons the rows are for, where both sides ran."""
    timed = [r for r in rows if "step_ms" in r]

    def find(kind: str, **match: Any) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in timed
                if r["row"] == kind and all(str(r.get(k)) == str(v) for k, v in match.items())
            ),
            None,
        )

    out: dict[str, Any] = {}
    sweep = [r for r in timed if r["row"] == "sweep"]
    if len(sweep) >= 2:
        fixed, per_image = fit_line([(r["images"], r["step_ms"]) for r in sweep])
        out["fixed_cost"] = {
            "fixed_ms": fixed,
            "ms_per_image": per_image,
            "fixed_share": {str(r["images"]): fixed / r["step_ms"] for r in sweep},
        }
    n = sizes.gpu_batch
    bare = find("sweep", images=n) or find("lightning", loop="bare")
    lightning = find("lightning", loop="lightning")
    if bare and lightning:
        out["lightning_over_bare"] = lightning["questions_per_s"] / bare["questions_per_s"]
    grouped = find("grouped")
    single = grouped and find("sweep", images=grouped["images"])
    if grouped and single:
        out["grouped_questions_per_s_ratio"] = (
            grouped["questions_per_s"] / single["questions_per_s"]
        )
    foreach = next((r for r in timed if r["row"] == "optimizer" and "foreach" in r["label"]), None)
    fused = next((r for r in timed if r["row"] == "optimizer" and "fused" in r["label"]), None)
    if foreach and fused:
        out["fused_saves_ms"] = foreach["step_ms"] - fused["step_ms"]
    anchor = find("anchor")
    if anchor and bare:
        out["anchor_share_of_step"] = anchor["step_ms"] / bare["step_ms"]
    graphs = find("graphs", compile="reduce-overhead")
    eager = fused or next((r for r in timed if r["row"] == "graphs" and "compile" not in r), None)
    if graphs and eager:
        out["graphs_speedup"] = eager["step_ms"] / graphs["step_ms"]
    return out


def section_gpu(ctx: Context) -> dict[str, Any]:
    """ResNet-101 @ 448 + bert-base (random init): the rows of ``ctx.gpu_rows``."""
    cuda = ctx.device.type == "cuda"
    wanted = [r for r in GPU_ROWS if r in ctx.gpu_rows]
    if not cuda and not ctx.gpu_smoke:
        reason = "no CUDA device (--gpu-smoke runs this row's code on the CPU at tiny sizes)"
        return {
            "smoke": False,
            "device": str(ctx.device),
            "rows": [
                {"row": kind, "label": GPU_ROW_TITLES[kind], "skipped": reason} for kind in wanted
            ],
            "summary": {},
        }
    device = ctx.device if cuda else torch.device("cpu")
    sizes = ctx.sizes
    overrides = [*sizes.gpu_overrides, f"fusion={ctx.gpu_fusion}"]
    if cuda:
        overrides.append("trainer.accelerator=gpu")
    bench = GpuBench(ctx, device, overrides)
    n = sizes.gpu_batch
    rows: list[dict[str, Any]] = []

    def run_row(kind: str, make: Callable[[], dict[str, Any] | list[dict[str, Any]]]) -> None:
        """A row that fails (out of memory, a compiler error) is recorded as failed and the
        section goes on: one GPU session has to bring back every row it can."""
        log.info("gpu: %s", kind)
        try:
            made = make()
        except Exception as err:
            log.exception("gpu row %s failed", kind)
            error = f"{type(err).__name__}: {err}"[:500]
            made = {"row": kind, "label": GPU_ROW_TITLES[kind], "error": error}
            bench.release()
        rows.extend(made if isinstance(made, list) else [made])

    if "sweep" in wanted:
        for images in sizes.gpu_sweep:
            run_row("sweep", functools.partial(bench.bare_row, "sweep", images, 1))
    if "grouped" in wanted:
        run_row("grouped", functools.partial(bench.bare_row, "grouped", *sizes.gpu_grouped))
    if "optimizer" in wanted:
        for kwargs in ({"foreach": True}, {"fused": True}):
            run_row(
                "optimizer",
                functools.partial(bench.bare_row, "optimizer", n, 1, kwargs, count_step_ops=True),
            )
    if "lightning" in wanted:
        if not any(r["row"] == "sweep" and r["images"] == n for r in rows):
            run_row("lightning", functools.partial(bench.bare_row, "lightning", n, 1))
        run_row("lightning", bench.lightning_row)
    if "anchor" in wanted:
        run_row("anchor", bench.anchor_row)
    if "e2e" in wanted:
        bench.release()
        run_row("e2e", functools.partial(e2e_row, ctx, bench.peak))
    if "graphs" in wanted:
        if cuda or "graphs" in ctx.gpu_rows_asked:
            if not any(r["row"] == "optimizer" and "fused" in r["label"] for r in rows):
                run_row(
                    "graphs", functools.partial(bench.bare_row, "graphs", n, 1, {"fused": True})
                )
            run_row("graphs", bench.graphs_row)
        else:
            rows.append(
                {
                    "row": "graphs",
                    "label": GPU_ROW_TITLES["graphs"],
                    "skipped": "CUDA graphs need CUDA, and torch.compile of the model takes "
                    "minutes on a CPU (--gpu-rows graphs runs the compiled step here anyway)",
                }
            )
    model_built = bench._module is not None
    return {
        "smoke": not cuda,
        "device": bench.device_name,
        "peak_bf16_flops": bench.peak,
        "config": " ".join(overrides),
        "precision": bench.precision,
        "channels_last": bench.channels_last,
        "image_size": bench.image_size,
        "question_tokens": sizes.gpu_length,
        "warmup_steps": sizes.gpu_warmup,
        "timed_steps": sizes.gpu_steps,
        "trainable_params": sum(p.numel() for p in bench.module.parameters() if p.requires_grad)
        if model_built
        else None,
        "flop_method": FLOP_METHOD,
        "graphs_note": GRAPHS_NOTE,
        "note": "synthetic in-memory batches (random pixels, token ids and targets of the real "
        "shapes; one batch per row pair, alternating) so the bare and Lightning rows measure the "
        "model, not JPEG decoding; the device is synchronised at both ends of each timed window "
        "only; Lightning without callbacks/logger/progress bar; the e2e row is train.py as a user "
        "runs it (its loader, Lightning, callbacks, CSV logger), its model the recipe's (layer1 "
        "frozen, frozen BatchNorm), so compare it with the grouped row for the order of "
        "magnitude only; MFU null where the device has no peak in the table",
        "rows": rows,
        "summary": gpu_summary(rows, sizes),
    }


# ------------------------------------------------------------------------------- section 6


# Fused AdamW: the other implementations keep each parameter's step count on the CPU and read it
# with .item() every step, host reads that make no GPU wait but would fill the sync column.
OPS_OVERRIDES = ["data.num_workers=0", "+module.optimizer.fused=true"]
OPS_NOTE = (
    "aten ops = every op the dispatcher ran (views included), a proxy for the kernels a GPU "
    "launches; host syncs = ops whose result the host must wait for (.item(), bool(t), nonzero "
    "and boolean indexing, copies to the CPU) plus Python calls of Tensor.item/tolist/cpu/numpy "
    "(vqa.utils.op_counter; one .item() on a CPU tensor counts as both). Phases: forward = "
    "modality dropout, model and loss (Lightning: training_step, with its metrics and logging); "
    "backward; optimizer = clipping, AdamW step, LR schedule (Lightning: everything until the next "
    "batch starts). The counted step is the second one: the first creates the optimizer state"
)


def count_phases(phases: Iterable[tuple[str, Callable[[], Any]]]) -> dict[str, StepOps]:
    """Run each phase under its own op counter, in order."""
    counted: dict[str, StepOps] = {}
    for name, fn in phases:
        with count_ops() as ops:
            fn()
        counted[name] = ops
    return counted


def count_bare_step(loop: BareLoop, batch: VQABatch) -> dict[str, StepOps]:
    loss: list[Tensor] = []
    return count_phases(
        [
            ("forward", lambda: loss.append(loop.forward(batch))),
            ("backward", lambda: loop.backward(loss[0])),
            ("optimizer", loop.optimizer_step),
        ]
    )


def merge_ops(records: Iterable[tuple[str, StepOps]]) -> dict[str, StepOps]:
    merged: dict[str, StepOps] = {}
    for phase, ops in records:
        into = merged.setdefault(phase, StepOps())
        into.ops.update(ops.ops)
        into.syncs.update(ops.syncs)
        into.host_reads.update(ops.host_reads)
    return merged


def ops_summary(phases: dict[str, StepOps], steps: int = 1, top: int = 10) -> dict[str, Any]:
    """Per-step counts (``steps`` counted steps averaged), by phase, with the ``top`` ops."""
    total = merge_ops(("total", ops) for ops in phases.values()).get("total", StepOps())
    return {
        "steps_counted": steps,
        "kernels": total.kernels / steps,
        "phases": {name: ops.kernels / steps for name, ops in phases.items()},
        "host_syncs": total.host_syncs / steps,
        "phase_host_syncs": {name: ops.host_syncs / steps for name, ops in phases.items()},
        "syncs": {name: n / steps for name, n in total.syncs.most_common()},
        "host_reads": {name: n / steps for name, n in total.host_reads.most_common()},
        "top_ops": [[name, n / steps] for name, n in total.ops.most_common(top)],
    }


class OpsWindow(pl.Callback):
    """Counts the ops of training steps ``first`` .. ``first + steps - 1`` of a fit, each from its
    ``on_train_batch_start`` to the next one, split at the backward hooks into forward, backward
    and optimizer phases."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps = first, steps
        self.records: list[tuple[str, StepOps]] = []
        self._started = 0
        self._open: contextlib.ExitStack | None = None

    def _switch(self, phase: str | None) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None
        if phase is not None:
            self._open = contextlib.ExitStack()
            self.records.append((phase, self._open.enter_context(count_ops())))

    def on_train_batch_start(self, *args: Any) -> None:
        index, self._started = self._started, self._started + 1
        self._switch("forward" if self.first <= index < self.first + self.steps else None)

    def on_before_backward(self, *args: Any) -> None:
        if self._open is not None:
            self._switch("backward")

    def on_after_backward(self, *args: Any) -> None:
        if self._open is not None:
            self._switch("optimizer")

    def on_train_end(self, *args: Any) -> None:
        self._switch(None)

    def on_exception(self, *args: Any) -> None:
        self._switch(None)

    @property
    def phases(self) -> dict[str, StepOps]:
        return merge_ops(self.records)


def section_ops(ctx: Context) -> dict[str, Any]:
    """Per fusion block: one bare step and one Lightning step (no callbacks or logger); for the
    quick-start's own block also Lightning with the user's callbacks and logger, averaged over
    ``log_every_n_steps`` steps (one logging step among them)."""
    sizes, device = ctx.sizes, ctx.device
    first = sizes.ops_first
    rows = []
    cfg = None
    for fusion in ctx.fusions:
        workdir = ctx.workdir / "ops" / fusion
        cfg = compose_config([*sizes.base_overrides, f"fusion={fusion}", *OPS_OVERRIDES], workdir)
        if device.type == "cuda":
            with open_dict(cfg):
                cfg.trainer.accelerator, cfg.trainer.devices = "gpu", 1
        pl.seed_everything(cfg.seed, verbose=False)
        datamodule, module = build_components(cfg)
        with_user = fusion == ctx.default_fusion
        window = int(cfg.trainer.log_every_n_steps) if with_user else 1
        batches = collect_batches(datamodule, first + window + 1)
        initial = copy.deepcopy(module.state_dict())

        module.to(device).train()
        loop = BareLoop(
            module, first + 2, cfg.trainer.gradient_clip_val, cfg.trainer.precision, device
        )
        on_device = [to_device(b, device) for b in batches[: first + 1]]
        for batch in on_device[:first]:
            loop.step(batch)
        rows.append(
            {
                "fusion": fusion,
                "loop": "bare",
                **ops_summary(count_bare_step(loop, on_device[first])),
            }
        )
        del loop, on_device
        for user_callbacks in (False, True) if with_user else (False,):
            steps = window if user_callbacks else 1
            module.load_state_dict(initial)
            counter = OpsWindow(first, steps)
            lightning_fit(
                cfg,
                module,
                batches[: first + steps + 1],
                workdir / f"fit-{'user' if user_callbacks else 'bare'}",
                user_callbacks=user_callbacks,
                extra_callbacks=[counter],
            )
            loop_name = "lightning + callbacks, logger" if user_callbacks else "lightning"
            rows.append({"fusion": fusion, "loop": loop_name, **ops_summary(counter.phases, steps)})
        log.info("ops: %s done", fusion)
    return {
        "config": " ".join([*sizes.base_overrides, "fusion=<name>", *OPS_OVERRIDES]),
        "device": str(device),
        "precision": None if cfg is None else str(cfg.trainer.precision),
        "callbacks": None
        if cfg is None
        else sorted(k for k, v in (cfg.get("callbacks") or {}).items() if v),
        "logger": None
        if cfg is None
        else sorted(k for k, v in (cfg.get("logger") or {}).items() if v),
        "note": OPS_NOTE,
        "rows": rows,
    }


# ------------------------------------------------------------------------------- driver


@dataclass
class Context:
    sizes: Sizes
    fusions: list[str]
    device: torch.device
    threads: int
    repeats: int
    scale_repeats: int
    isolate: bool
    workdir: Path
    default_fusion: str
    gpu_fusion: str
    gpu_smoke: bool
    gpu_rows: list[str] = field(default_factory=lambda: list(GPU_ROWS))
    gpu_rows_asked: list[str] = field(default_factory=list)  # named on the command line
    e2e_seconds: float | None = None
    e2e_dir: Path | None = None
    _store: dict[str, Any] | None = None

    def spec(self, overrides: list[str]) -> dict[str, Any]:
        return {
            "overrides": overrides,
            "threads": self.threads,
            "device": str(self.device),
            "warmup": self.sizes.warmup,
            "steps": self.sizes.steps,
        }

    def feature_store(self) -> dict[str, Any]:
        if self._store is None:
            self._store = build_feature_store(self.sizes, self.workdir, self.threads)
        return self._store


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
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


# ------------------------------------------------------------------------------- markdown


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """Markdown table; ``align`` has one letter per column: l(eft) or r(ight)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _md_fusions(s: dict[str, Any]) -> list[str]:
    rss = s["isolated"]
    header = ["fusion", "input", "samples/s", "images/s", "ms/step", "peak tensor MiB"]
    header += ["peak RSS MiB", "RSS increase MiB"] if rss else []
    rows = []
    for r in s["rows"]:
        row = [
            r["fusion"],
            "cached (encoder frozen)" if r["path"] == "cached" else "images",
            _f(r["samples_per_s"]),
            _f(r["images_per_s"]),
            _f(r["step_ms"]),
            _f(r["peak_memory_mib"]),
        ]
        if rss:
            row += [_f(r.get("peak_rss_mib"), 0), _f(r.get("rss_increase_mib"), 0)]
        rows.append(row)
    store = s["feature_store"]
    return [
        "## 1. Training throughput and memory per fusion block",
        "",
        f"`{s['config']}`; bare training steps (section 2 gives Lightning's extra cost), "
        f"{s['timed_steps']} timed after {s['warmup_steps']} warm-up, batches already in memory; "
        f"samples = questions. Cached: {s['cached_note']}; the store "
        f"({store['images']} images, {_f(store['kib_per_image'])} KiB each) was written by "
        f"scripts/extract_features.py at {_f(store['extract_images_per_s'])} img/s. "
        f"Memory: {s['memory_method']}",
        "",
        *_table(header, "llrrrrrr"[: len(header)], rows),
    ]


def _md_overhead(s: dict[str, Any]) -> list[str]:
    t = s["trainer"]
    rows = [
        [
            kind,
            _f(s[f"{kind}_samples_per_s"]),
            ", ".join(_f(r["samples_per_s"]) for r in s["runs"] if r["kind"] == kind),
        ]
        for kind in ("lightning", "bare")
    ]
    verdict = "meets" if s["overhead_percent"] < s["goal_percent"] else "misses"
    return [
        "## 2. Framework overhead (Lightning vs bare PyTorch loop)",
        "",
        f"`{s['config']}`: precision {t['precision']}, gradient clip {t['gradient_clip_val']}, "
        f"callbacks {', '.join(t['callbacks'])}, logger {', '.join(t['logger']) or 'none'} "
        f"(log_every_n_steps {t['log_every_n_steps']}), as a user has them. Disabled: "
        f"{s['disabled']}. {s['pairs']} interleaved pairs (ABBA), each run from the same "
        f"initial weights, {s['timed_steps']} timed steps after {s['warmup_steps']} warm-up; "
        "medians. The progress bar (on stderr) was "
        f"{'drawn on a terminal' if s['progress_bar_on_terminal'] else 'not on a terminal'}.",
        "",
        *_table(["loop", "samples/s (median)", "runs"], "lrl", rows),
        "",
        f"Ratio Lightning / bare = **{s['ratio']:.3f}**: overhead "
        f"{s['overhead_percent']:.1f} % ({verdict} the < {s['goal_percent']:.0f} % goal).",
    ]


def _md_pipeline(s: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["path"],
            str(r["num_workers"]),
            _f(r["loader_startup_s"], 2),
            _f(r["loader_samples_per_s"]),
            _f(r["model_samples_per_s"]),
            f"{r['ratio']:.2f}×",
        ]
        for r in s["rows"]
    ]
    header = ["input", "workers", "loader start-up s", "loader samples/s", "model samples/s"]
    return [
        "## 3. Input pipeline vs model",
        "",
        f"fusion={s['fusion']}; {s['note']}. Goal: ratio ≥ {s['goal_ratio']:.0f}.",
        "",
        *_table([*header, "ratio"], "lrrrrr", rows),
        *([] if "jpeg" not in s else ["", *_md_jpeg(s["jpeg"])]),
    ]


JPEG_STAGES = (
    ("read_file", "read the file (page cache)"),
    ("pil_decode", "PIL decode to RGB"),
    ("resize", "resize (PIL, antialias)"),
    ("to_tensor_normalise", "to tensor, float, normalise"),
    ("dataset_image", "**the dataset's whole image path** (file to normalised tensor)"),
    ("batch_in_process", "a worker's whole batch (rows, images, collate), per decoded image"),
    ("torchvision_decode_cpu", "torchvision.io.decode_jpeg on CPU (instead of PIL decode)"),
)


def _md_jpeg(j: dict[str, Any]) -> list[str]:
    d, x = j["data_set"], j["extrapolation"]
    rows = [
        [
            str(r["num_workers"]),
            _f(r["startup_s"], 2),
            _f(r["questions_per_s"]),
            _f(r["images_per_s"]),
            _f(r["images_per_s_per_worker"]),
            f"{r['per_worker_vs_one_worker']:.2f}",
        ]
        for r in j["rows"]
    ]
    header = ["workers", "start-up s", "questions/s", "images/s", "images/s per worker"]
    stages = [[label, _f(j["stages_ms"][key], 2)] for key, label in JPEG_STAGES]
    verdict = "clears" if x["clears_goal"] else "does **not** clear"
    return [
        f"### COCO-sized JPEGs through the VQA v2 loader ({j['image_size']} px)",
        "",
        f"`{j['config']}`: {d['images']} generated photo-like JPEGs of {d['width']}×{d['height']} "
        f"(quality {d['jpeg_quality']}, {_f(d['jpeg_kib_mean'])} KiB mean), {d['questions']} "
        f"questions, batches of {j['batch_size']} questions (image-grouped "
        f"{j['group_by_image']}). {j['note']}.",
        "",
        *_table([*header, "per worker vs 1 worker"], "rrrrrr", rows),
        "",
        f"Where a worker's time goes, ms per image ({_f(j['in_process_images_per_s'])} images/s "
        "for the whole path in-process):",
        "",
        *_table(["stage", "ms/image"], "lr", stages),
        "",
        f"{x['basis'].capitalize()} took {_f(j['one_worker_ms_per_image'], 2)} ms per decoded "
        "image: beyond a worker's whole batch in-process, that is the batch's handover to the "
        "main process (shared memory), plus the drift between separately timed runs.",
        "",
        f"**Extrapolation, not a measurement:** {_f(x['per_worker_images_per_s'])} images/s per "
        f"worker ({x['basis']}) × {x['workers']} workers × {x['questions_per_image']} questions "
        f"per image (VQA v2) = **{_f(x['questions_per_s'], 0)} questions/s**, which {verdict} the "
        f"{_f(x['goal_questions_per_s'], 0)} questions/s goal. The same at the recipe's "
        f"num_workers={x['recipe_workers']}: {_f(x['recipe_workers_questions_per_s'], 0)}; at "
        f"the per-worker rate of the {x['slowest_row_workers']}-worker row (the slowest): "
        f"{_f(x['slowest_row_questions_per_s'], 0)}; from "
        f"the row's own questions/s ({x['measured_questions_per_decode']:.2f} questions per "
        f"decode here) × {x['workers']}: {_f(x['from_row_questions_per_s'], 0)}; from "
        f"the in-process cost alone (no collate, no transfer between processes): "
        f"{_f(x['in_process_questions_per_s'], 0)}. Assumes {x['assumes']}.",
    ]


def _md_scaling(s: dict[str, Any]) -> list[str]:
    settings = [(x["grid"], x["length"]) for x in s["settings"]]
    base = (s["base"]["grid"], s["base"]["length"])
    labels = [f"{g}×{g}, N={n}" for g, n in settings]
    groups: dict[tuple[str, str], dict[tuple[int, int], dict[str, Any]]] = {}
    for r in s["rows"]:
        groups.setdefault((r["fusion"], r["attention"]), {})[(r["grid"], r["length"])] = r

    def cell(values: dict[tuple[int, int], dict[str, Any]], key: tuple[int, int], m: str) -> str:
        value, ref = values[key][m], values[base][m]
        ratio = f" ({value / ref:.1f}×)" if key != base and ref else ""
        return f"{_f(value)}{ratio}"

    out = [
        "## 4. Scaling with grid and question length",
        "",
        f"Batch {s['batch']}, visual stage channels {s['channels']} (each stage twice as fine "
        f"as the next), text {s['text_dim']}-d, hidden {s['hidden_dim']}; {s['note']} Grid = "
        f"last stage; ratios against {labels[settings.index(base)]}.",
    ]
    for metric, title in (("ms", "ms per step"), ("memory_mib", "MiB per step")):
        rows = [
            [fusion, attention]
            + ([f"{next(iter(v.values()))['params'] / 1e6:.2f}M"] if metric == "ms" else [])
            + [cell(v, key, metric) for key in settings]
            for (fusion, attention), v in groups.items()
        ]
        header = ["fusion", "attention", *(["params"] if metric == "ms" else []), *labels]
        out += ["", f"{title}:", "", *_table(header, "ll" + "r" * (len(header) - 2), rows)]
    return out


def _n(value: float) -> str:
    """A per-step count: whole when it is one, else one decimal (averaged over steps)."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _op_list(counts: Iterable[tuple[str, float]] | dict[str, float]) -> str:
    items = counts.items() if isinstance(counts, dict) else counts
    return ", ".join(f"{name.removeprefix('aten.')} {_n(n)}" for name, n in items) or "none"


def _md_gpu(s: dict[str, Any]) -> list[str]:
    out = ["## 5. GPU: fixed cost per step, optimizer, Lightning, CUDA graphs, end to end", ""]
    header = ["row", "setting", "images/step", "questions/step", "ms/step", "questions/s"]
    header += ["images/s", "TFLOP/s", "MFU", "peak MiB"]
    rows = []
    for r in s["rows"]:
        if "step_ms" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error')}"
            rows.append([r["row"], r["label"], why, *[""] * (len(header) - 3)])
            continue
        rows.append(
            [
                r["row"],
                r["label"],
                _f(r["images"], 0 if float(r["images"]).is_integer() else 1),
                "n/a" if r["questions"] is None else _f(r["questions"], 1).removesuffix(".0"),
                _f(r["step_ms"]),
                _f(r["questions_per_s"]),
                _f(r["images_per_s"]),
                _f(r["achieved_tflops"], 3),
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %",
                _f(r["peak_memory_mib"], 0),
            ]
        )
    if "config" not in s:  # every row skipped before anything was composed
        return [*out, *_table(header, "ll" + "r" * (len(header) - 2), rows)]
    smoke = "SMOKE RUN: tiny sizes on CPU, not a GPU figure. " if s["smoke"] else ""
    peak = "n/a" if s["peak_bf16_flops"] is None else _f(s["peak_bf16_flops"] / 1e12)
    out += [
        f"{smoke}Device {s['device']} (peak bf16 {peak} TFLOP/s), `{s['config']}`, precision "
        f"{s['precision']}, channels_last {s['channels_last']}, {s['image_size']} px, "
        f"{s['question_tokens']} tokens per question; {s['timed_steps']} timed steps after "
        f"{s['warmup_steps']} warm-up. FLOPs: {s['flop_method']} Notes: {s['note']}.",
        "",
        *_table(header, "ll" + "r" * (len(header) - 2), rows),
    ]
    found = []
    summary = s["summary"]
    if fixed := summary.get("fixed_cost"):
        shares = ", ".join(
            f"{100 * share:.0f} % at {images} images"
            for images, share in fixed["fixed_share"].items()
        )
        found.append(
            f"Fixed cost (least-squares line of ms/step over images/step, sweep rows): "
            f"**{_f(fixed['fixed_ms'])} ms per step** + {_f(fixed['ms_per_image'], 2)} ms per "
            f"image; the fixed part is {shares}."
        )
    if "grouped_questions_per_s_ratio" in summary:
        found.append(
            f"Image-grouped batches: {summary['grouped_questions_per_s_ratio']:.2f}x the "
            "questions/s of one question per image at the same images per step."
        )
    if "fused_saves_ms" in summary:
        found.append(
            f"AdamW fused instead of foreach: {_f(summary['fused_saves_ms'])} ms less per step."
        )
    for r in s["rows"]:
        if r["row"] == "optimizer" and "ops" in r:
            o = r["ops"]
            found.append(
                f"One bare step, {r['label']}: {_n(o['kernels'])} aten ops (forward "
                f"{_n(o['phases']['forward'])}, backward {_n(o['phases']['backward'])}, optimizer "
                f"{_n(o['phases']['optimizer'])}), {_n(o['host_syncs'])} host syncs "
                f"({_op_list(o['syncs'])}; host reads: {_op_list(o['host_reads'])})."
            )
    if "lightning_over_bare" in summary:
        found.append(
            f"Lightning / bare loop, questions/s: **{summary['lightning_over_bare']:.3f}**."
        )
    if "anchor_share_of_step" in summary:
        found.append(
            f"The ResNet alone takes {100 * summary['anchor_share_of_step']:.0f} % of the VQA "
            "model's bare step at the same images per step."
        )
    for r in s["rows"]:
        if r["row"] == "graphs" and "compile_first_step_s" in r:
            speedup = summary.get("graphs_speedup")
            graphs = "CUDA graphs in use" if r["cuda_graphs"] else "**no CUDA graphs**"
            found.append(
                f"torch.compile(mode='reduce-overhead'): **"
                f"{'n/a' if speedup is None else f'{speedup:.2f}x'}** the eager step rate "
                f"({graphs}: {r['cudagraph_skips']} cudagraph skip(s), which TORCH_LOGS=perf_hints "
                f"names); first (compiling) step {_f(r['compile_first_step_s'])} s, "
                f"{r['unique_graphs']} graph(s), {r['graph_breaks']} graph break(s)"
                f"{': ' + '; '.join(r['graph_break_reasons']) if r['graph_breaks'] else ''}. "
                f"{s['graphs_note']}."
            )
        if r["row"] == "e2e" and "step_ms" in r:
            period = r["period_ms"]
            found.append(
                f"End to end: `{r['command']}`: {r['steps_run']} steps in {r['epochs']} "
                f"epoch(s), {r['steps_timed']} timed after {r['warmup_steps']}; start-to-start "
                f"ms median {_f(period['median'])}, p90 {_f(period['p90'])}, max "
                f"{_f(period['max'])}; process start to first step {_f(r['startup_s'])} s."
            )
        if r["row"] == "e2e" and "error" in r:
            found.append(f"End to end: `{r['command']}` failed: {r['error']}.")
    return [*out, "", *[f"- {line}" for line in found]] if found else out


def _sync_cell(r: dict[str, Any]) -> str:
    where = {k: v for k, v in r["phase_host_syncs"].items() if v}
    cell = f"{_op_list(r['syncs'])}; reads: {_op_list(r['host_reads'])}"
    return f"{cell} (in {_op_list(where)})" if where else cell


def _md_ops(s: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["fusion"],
            r["loop"],
            _n(r["kernels"]),
            _n(r["phases"].get("forward", 0)),
            _n(r["phases"].get("backward", 0)),
            _n(r["phases"].get("optimizer", 0)),
            _n(r["host_syncs"]),
            _sync_cell(r),
            _op_list(r["top_ops"]),
        ]
        for r in s["rows"]
    ]
    header = ["fusion", "loop", "aten ops/step", "forward", "backward", "optimizer"]
    header += ["host syncs/step", "syncs by op", "top 10 ops"]
    return [
        "## 6. Kernels and host syncs per training step",
        "",
        f"`{s['config']}` on {s['device']}, precision {s['precision']}. Lightning rows: a real "
        f"Trainer, no callbacks or logger; *callbacks, logger*: the user's ({', '.join(s['callbacks'] or [])}; "
        f"logger {', '.join(s['logger'] or []) or 'none'}), averaged over log_every_n_steps steps. "
        f"{s['note']}.",
        "",
        *_table(header, "llrrrrrll", rows),
    ]


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    out = [
        "# Benchmark",
        "",
        f"`{meta['command']}`: torch {meta['torch']}, Lightning {meta['lightning']}, device "
        f"{meta['device']}, {meta['threads']} torch thread(s) (torch.set_num_threads in every "
        f"process), {meta['cpu_count']} CPUs, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in meta['load_average'])}; wall {meta['wall_s']:.0f} s.",
    ]
    if meta.get("other_processes_cores") is not None:
        out[-1] += (
            f" Other processes used {meta['other_processes_cores']:.2f} cores on average "
            "meanwhile (/proc/stat minus this run's own CPU time): read the figures with that in "
            "mind."
        )
    q = meta["quickstart"]
    out += [
        "",
        f"Quick-start as composed now: fusion={q['fusion']} (hidden {q['fusion_hidden_dim']}), "
        f"{q['visual']} stages {q['visual_stages']} (freeze {q['visual_freeze']}), {q['text']}, "
        f"{q['image_size']} px, batch {q['batch_size']} questions (image-grouped "
        f"{q['group_by_image']}), {q['num_workers']} loader workers, precision {q['precision']}.",
    ]
    writers = {
        "fusions": _md_fusions,
        "overhead": _md_overhead,
        "pipeline": _md_pipeline,
        "scaling": _md_scaling,
        "gpu": _md_gpu,
        "ops": _md_ops,
    }
    for name, write in writers.items():
        if name in report:
            out += ["", *write(report[name])]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
