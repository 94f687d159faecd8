"""What every section shares: sizes and the run context, config composition, quiet logging,
batches, the bare PyTorch loop and the Lightning run, timing, memory tracking, RSS and CPU time,
the feature store."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import sys
import time
import weakref
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader
from torch.utils.weak import WeakIdKeyDictionary

from vqa.data.batch import VQABatch
from vqa.lit_module import VQALitModule
from vqa.optim import build_optimization
from vqa.utils import (
    drop_logger_only_callbacks,
    instantiate_callbacks,
    instantiate_loggers,
)
from vqa.utils.project import (
    CONFIG_DIR,
    TINY_DATA_OVERRIDES,
    TINY_MODEL_OVERRIDES,
    compose_run_config,
    silence_known_noise,
)

ROOT = Path(__file__).resolve().parents[2]  # the repository

log = logging.getLogger("benchmark")

SECTIONS = ("fusions", "overhead", "pipeline", "scaling", "gpu", "ops", "latency")
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
            "experiment=none",  # train.yaml's base, not its default quick-start preset
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
    # section 7: models answered one question at a time (name -> overrides of configs/train.yaml)
    latency_models: dict[str, list[str]] = field(
        default_factory=lambda: {name: list(o) for name, o in LATENCY_MODELS.items()}
    )
    latency_warmup: int = 10  # untimed rounds: a new image and a follow-up each
    latency_new_images: int = 24  # timed first questions about an image (cache misses)
    latency_follow_ups: int = 72  # timed follow-up questions (cache hits), 3 per new image
    latency_stage_repeats: int = 20  # timed runs of each step of a call, median kept
    latency_cache_size: int = 32
    latency_tiny: bool = False  # tiny stand-ins of the two models: no goal verdict


# The quick-start reads its frozen encoder's maps from the feature cache; the benchmark's base is
# the end-to-end image path with the encoder trained, and its *cached* rows freeze it and read a
# store of their own (fusion_overrides).
QUICKSTART = ["experiment=quickstart", "data.features=images", "model.visual.freeze=none"]
# Tiny composition for tests: the same one as the test suite's, so a test session's data is reused.
# QUICKSTART comes after the tiny overrides so that its `experiment=quickstart` replaces their
# `experiment=none` (Hydra takes the last choice of a group).
TINY = [
    *TINY_MODEL_OVERRIDES,
    *TINY_DATA_OVERRIDES,
    *QUICKSTART,
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


# Section 7: the quick-start model as `make train` trains it, but reading images (its training
# reads the frozen encoder's cached maps), and the VQA v2 recipe's ResNet-101 @ 448 px +
# bert-base with random weights (parallel co-attention over layer4, 14x14 cells).
LATENCY_MODELS: dict[str, list[str]] = {
    "quickstart": ["experiment=quickstart", "data.features=images"],
    "resnet101_bert_base": [
        "experiment=none",  # train.yaml's base, not its default quick-start preset
        "model/visual=resnet101",
        "model.visual.stages=[layer4]",
        "model/text=bert_base_random",
        "data.image_size=448",
        "fusion=parallel",
    ],
}
# The same two at tiny sizes (tests): bert_tiny, ResNet-18, 32 px.
LATENCY_MODELS_TINY: dict[str, list[str]] = {
    "quickstart": [*TINY, "fusion=film"],
    "resnet101_bert_base": [*TINY, "fusion=parallel"],
}


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
        latency_models={name: list(o) for name, o in LATENCY_MODELS_TINY.items()},
        latency_warmup=1,
        latency_new_images=2,
        latency_follow_ups=4,
        latency_stage_repeats=2,
        latency_tiny=True,
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
        # What VQALitModule.configure_optimizers builds, for a run of total_steps steps;
        # optimizer_kwargs go to the configured optimizer (fused=True, foreach=True).
        optimizer = module.optimizer_factory
        if optimizer_kwargs:
            optimizer = functools.partial(optimizer, **optimizer_kwargs)
        built = build_optimization(
            module.parameter_groups(), optimizer, module.scheduler_factory, total_steps
        )
        self.optimizer = built["optimizer"]
        self.scheduler = built["lr_scheduler"]["scheduler"] if "lr_scheduler" in built else None
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
        if self.scheduler is not None:
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


# ------------------------------------------------------------------------------- feature store


def build_feature_store(sizes: Sizes, workdir: Path, threads: int) -> dict[str, Any]:
    """The frozen encoder's training-split store, written by the project's extractor."""
    from vqa.cli.extract import extract

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
    (report,) = extract(cfg)
    return {
        "feature_dir": str(feature_dir),
        "images": report.num_images,
        "extract_images_per_s": report.images_per_second,
        "kib_per_image": report.bytes_per_image / 1024,
    }


# ------------------------------------------------------------------------------- context


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
