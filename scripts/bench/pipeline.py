"""Section 3, ``pipeline``: data-loader rate vs the training step's, and the VQA v2 recipe's JPEG
loader at 448 px with its per-image stage costs."""

from __future__ import annotations

import gc
import io
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

from scripts.bench.common import Context, compose_config, num_samples
from scripts.bench.fusions import fusion_overrides, run_specs
from vqa.data.dataset import VQADataset, row_image
from vqa.data.images import load_rgb
from vqa.data.shapes import ShapesConfig, generate

# ------------------------------------------------------------------------------- section 3


def fit_datamodule(overrides: Sequence[str], workdir: Path) -> pl.LightningDataModule:
    """The composed run's data module, seeded and set up for fitting as ``train.py`` does."""
    cfg = compose_config(overrides, workdir)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def loader_rate(overrides: Sequence[str], batches: int, workdir: Path) -> dict[str, Any]:
    """Samples/s of the training loader alone (worker start-up reported apart)."""
    datamodule = fit_datamodule(overrides, workdir)
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
        "num_workers": datamodule.num_workers,
        "startup_s": first - begin,
        "samples_per_s": samples / seconds,
    }


# Most COCO images are 640 px on the long side, 640x480 the commonest; VQA v2 asks 443,757
# training questions about its 82,783 train2014 images.
COCO_SIZE = (640, 480)
COCO_JPEG_QUALITY = 90
VQA_V2_QUESTIONS_PER_IMAGE = 5.4
# The loader rate the GPU step's goal needs for the 448 px recipe on a 16-core GPU host.
LOADER_GOAL_QUESTIONS_PER_S = 3000.0
TARGET_WORKERS = 16
# The VQA v2 recipe's data side as train.py composes it. The loader is handed no tokenizer choice,
# so it builds WordPiece from the questions (bert-base-uncased cannot be downloaded here). No CUDA
# to pin for, and the synthetic answers are too few for the recipe's count threshold (the
# vocabulary size barely touches the loader).
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
    datamodule = fit_datamodule(overrides, workdir)
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
    workers = datamodule.num_workers
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
