"""Section 5, ``gpu``: the recipe's step on a GPU, the rows of ``--gpu-rows`` (sweep, grouped,
optimizer, lightning, anchor, e2e, graphs) with model-FLOPs utilisation."""

from __future__ import annotations

import copy
import functools
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from scripts.bench.common import (
    FLOP_METHOD,
    GPU_ROWS,
    PEAK_BF16_FLOPS,
    ROOT,
    BareLoop,
    Context,
    Sizes,
    autocast_context,
    compose_config,
    describe,
    lightning_fit,
    log,
    mib,
    steady_rate,
    synchronize,
    to_device,
)
from scripts.bench.ops import count_bare_step, ops_summary
from vqa.data.batch import VQABatch
from vqa.lit_module import VQALitModule
from vqa.metrics import ANSWER_TYPES

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
        "+callbacks.bench_step_log._target_=scripts.bench.gpu.StepLog",
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
