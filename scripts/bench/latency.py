"""Section 7, ``latency``: one answer at a time through :class:`vqa.inference.Predictor` on CPU,
a new image (its features computed and cached) vs a follow-up question about an image already
seen (its features read from the cache), for the quick-start model and ResNet-101 @ 448 px +
bert-base; and where a follow-up's time goes."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from scripts.bench.common import Context, compose_config, log
from vqa.checkpoint import TrainedModel, build_model
from vqa.data.tokenizer import tokenizer_spec
from vqa.inference import Predictor, image_digest, read_image

# ------------------------------------------------------------------------------- section 7

GOAL_MODEL = "resnet101_bert_base"
GOAL_P95_MS = 50.0
NEW_IMAGE = "(new image)"
# the goal model again, served with Predictor(cpu_packed_linear=True)
PACKED_ROW = "prepacked linear"  # marks the steps a follow-up question skips
LATENCY_NOTE = (
    "random weights (latency does not depend on their values; nothing pretrained can be "
    "downloaded here), built from the composed config as a checkpoint would rebuild it; "
    "Predictor.predict(path, question, top_k=5) timed as a caller sees it: read and decode the "
    "file, pixel digest, tokenise, model, top-k, CPU attention maps. Images and questions are "
    "the synthetic set's (data/shapes val2014, 128 px JPEGs, its own questions about each "
    "image); each new image is followed by follow-up questions about it"
)


def build_trained(cfg: DictConfig) -> TrainedModel:
    """What :func:`vqa.checkpoint.load_checkpoint` would return for a run of ``cfg``, with
    random weights: the datamodule's answer vocabulary and tokenizer, the model rebuilt by
    :func:`vqa.checkpoint.build_model` from the resolved model config."""
    datamodule = instantiate(cfg.data)
    datamodule.use_tokenizer(tokenizer_spec(cfg.model.get("text")))
    datamodule.prepare_data()
    datamodule.setup("fit")
    run_config = {
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
    }
    model = build_model(
        run_config["model"],
        num_answers=len(datamodule.answer_vocab),
        vocab_size=len(datamodule.tokenizer),
    ).eval()
    return TrainedModel(
        model=model,
        answer_vocab=datamodule.answer_vocab,
        tokenizer=datamodule.tokenizer,
        run_config=run_config,
        hparams={"loss": cfg.module.loss},
        path=Path("random-weights.ckpt"),
    )


def questions_by_image(cfg: DictConfig, split: str = "val2014") -> list[tuple[Path, list[str]]]:
    """Each image of ``split`` with the questions asked about it, in file order."""
    root = Path(cfg.data.root)
    records = json.loads(
        (root / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text()
    )["questions"]
    grouped: dict[int, list[str]] = {}
    for record in records:
        grouped.setdefault(record["image_id"], []).append(record["question"])
    folder = root / "Images" / "mscoco" / split
    return [
        (folder / f"COCO_{split}_{image_id:012d}.jpg", questions)
        for image_id, questions in grouped.items()
    ]


def summary(samples_ms: list[float]) -> dict[str, Any]:
    """p50 / p95 (linear interpolation), mean, min, max of per-call times in ms."""
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "n": len(samples_ms),
        "p50_ms": float(np.percentile(values, 50)),
        "p95_ms": float(np.percentile(values, 95)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "max_ms": float(values.max()),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1000, result


def measure_calls(
    predictor: Predictor,
    images: list[tuple[Path, list[str]]],
    warmup: int,
    new_images: int,
    follow_ups: int,
) -> dict[str, Any]:
    """Time ``new_images`` first questions (cache misses) and ``follow_ups`` follow-up
    questions (hits), after ``warmup`` untimed rounds of both; an image is new to the cache
    when it is first asked about (the cache is cleared if the set runs out of images)."""
    per_image = -(-follow_ups // new_images)  # follow-ups after each new image
    queue = iter(cycle_images(images, warmup + new_images))
    misses: list[float] = []
    hits: list[float] = []
    for round_ in range(warmup + new_images):
        image, questions, cleared = next(queue)
        if cleared:
            predictor.clear_cache()
        ms, first = timed(lambda image=image, q=questions[0]: predictor.predict(image, q))
        if first.image_cached:
            raise RuntimeError(f"{image} was expected to be new to the cache")
        asked = 1  # a warm-up round: one follow-up
        if round_ >= warmup:
            misses.append(ms)
            asked = min(per_image, follow_ups - len(hits))
        for k in range(asked):
            question = questions[1 + k % (len(questions) - 1)]
            ms, answer = timed(lambda image=image, q=question: predictor.predict(image, q))
            if not answer.image_cached:
                raise RuntimeError(f"{image} was expected in the cache")
            if round_ >= warmup:
                hits.append(ms)
    return {"miss": summary(misses), "hit": summary(hits)}


def cycle_images(
    images: list[tuple[Path, list[str]]], count: int
) -> Iterator[tuple[Path, list[str], bool]]:
    """``count`` images with at least two questions, in order, repeating the list when it
    runs out (and saying so: the cache must then be cleared for the image to be new)."""
    usable = [(path, qs) for path, qs in images if len(qs) >= 2]
    if not usable:
        raise ValueError("no image with two questions to time a follow-up on")
    for i in range(count):
        path, questions = usable[i % len(usable)]
        yield path, questions, i > 0 and i % len(usable) == 0


def stage_times(
    predictor: Predictor, image: Path, questions: list[str], repeats: int
) -> dict[str, float]:
    """Median ms of each step of a call, run one by one as :meth:`Predictor.run` runs them,
    the steps a new image adds included (a follow-up skips those marked ``NEW_IMAGE``)."""
    model = predictor.model
    samples: dict[str, list[float]] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        ms, out = timed(fn)
        samples.setdefault(name, []).append(ms)
        return out

    with torch.inference_mode():
        for r in range(repeats):
            question = questions[r % len(questions)]
            decoded = step("read and decode the image", lambda: read_image(image))
            step("pixel digest (cache key)", lambda decoded=decoded: image_digest(decoded))
            ids = step(
                "tokenise and check the question", lambda q=question: predictor.question_ids([q])
            )
            pixels = step(
                f"resize and normalise {NEW_IMAGE}",
                lambda decoded=decoded: predictor.preprocessor.pixels(decoded).unsqueeze(0),
            )
            maps = step(f"visual encoder {NEW_IMAGE}", lambda p=pixels: model.encode_image(p))
            prepared = step(
                f"fusion prepare_visual {NEW_IMAGE}",
                lambda m=maps: list(model.fusion.prepare_visual(m)),
            )
            input_ids, mask = step("pad to tensors", lambda ids=ids: predictor.pad(ids))
            index = torch.zeros(1, dtype=torch.long)
            rows = [part.index_select(0, index) for part in prepared]
            text = step(
                "text encoder",
                lambda i=input_ids, m=mask: model.text(i, m),
            )
            fused = step(
                "fusion (per question)",
                lambda r=rows, t=text, m=mask: model.fusion.fuse(r, t, m.bool()),
            )
            step("answer head", lambda f=fused: model.head(f.features))
    return {name: statistics.median(values) for name, values in samples.items()}


def section_latency(ctx: Context) -> dict[str, Any]:
    """Both models at ``ctx.threads`` torch threads, CPU."""
    sizes = ctx.sizes
    rows = []
    for name, overrides in sizes.latency_models.items():
        cfg = compose_config(overrides, ctx.workdir / "latency" / name)
        torch.manual_seed(0)
        trained = build_trained(cfg)
        images = questions_by_image(cfg)
        plain = None
        for packed in (False, True) if name == GOAL_MODEL else (False,):
            predictor = Predictor(
                trained, "cpu", cache_size=sizes.latency_cache_size, cpu_packed_linear=packed
            )
            row = latency_row(ctx, name, overrides, cfg, trained, predictor, images)
            if packed:
                row["model"] = f"{name} + {PACKED_ROW}"
                row["max_abs_logit_diff_vs_plain"] = max_logit_diff(plain, predictor, images)
            else:
                plain = predictor
            row["packed_linears"] = predictor.packed_linears
            rows.append(row)
            log.info(
                "latency %s: new image p50 %.1f p95 %.1f ms, follow-up p50 %.1f p95 %.1f ms",
                row["model"],
                row["miss"]["p50_ms"],
                row["miss"]["p95_ms"],
                row["hit"]["p50_ms"],
                row["hit"]["p95_ms"],
            )

    def goal_met(model: str) -> bool | None:
        row = None if sizes.latency_tiny else next((r for r in rows if r["model"] == model), None)
        return None if row is None else row["hit"]["p95_ms"] <= GOAL_P95_MS

    return {
        "tiny": sizes.latency_tiny,
        "device": "cpu",
        "threads": ctx.threads,
        "warmup_rounds": sizes.latency_warmup,
        "note": LATENCY_NOTE,
        "goal": {
            "model": GOAL_MODEL,
            "follow_up_p95_ms": GOAL_P95_MS,
            "met": goal_met(GOAL_MODEL),
            "met_prepacked_linear": goal_met(f"{GOAL_MODEL} + {PACKED_ROW}"),
        },
        "rows": rows,
    }


def latency_row(
    ctx: Context,
    name: str,
    overrides: list[str],
    cfg: DictConfig,
    trained: TrainedModel,
    predictor: Predictor,
    images: list[tuple[Path, list[str]]],
) -> dict[str, Any]:
    """One predictor's timed calls and step breakdown at ``ctx.threads`` torch threads."""
    sizes = ctx.sizes
    # The benchmark's entry point has set ctx.threads for the whole process.
    measured = measure_calls(
        predictor,
        images,
        sizes.latency_warmup,
        sizes.latency_new_images,
        sizes.latency_follow_ups,
    )
    path, questions = next((p, q) for p, q in images if len(q) >= 2)
    stages = stage_times(predictor, path, questions, sizes.latency_stage_repeats)
    threads = torch.get_num_threads()
    follow_up_steps = sum(ms for step, ms in stages.items() if NEW_IMAGE not in step)
    stats = predictor.cache_stats()
    model = trained.model
    return {
        "model": name,
        "overrides": " ".join(overrides),
        "visual": f"{cfg.model.visual.arch} {list(cfg.model.visual.stages)}",
        "text": f"BERT {_text_layers(model.text)} layers {model.text.hidden_size}-d",
        "fusion": type(model.fusion).__name__,
        "image_size": trained.image_size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "torch_threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        **measured,
        "cache": {"hits": stats.hits, "misses": stats.misses, "capacity": stats.capacity},
        "stages_ms": stages,
        "follow_up_steps_ms": follow_up_steps,
        # what the steps leave out: top-k, Prediction building, calls and checks between
        "follow_up_rest_ms": measured["hit"]["p50_ms"] - follow_up_steps,
    }


def max_logit_diff(
    plain: Predictor, other: Predictor, images: list[tuple[Path, list[str]]], count: int = 16
) -> float:
    """Largest |logit difference| of ``other`` vs ``plain`` over the first ``count``
    (image, question) pairs, one call each."""
    pairs = [(path, q) for path, qs in images for q in qs][:count]
    return max(
        (other.run([p], [q]).output.logits - plain.run([p], [q]).output.logits).abs().max().item()
        for p, q in pairs
    )


def _text_layers(text: torch.nn.Module) -> int | str:
    config = getattr(getattr(text, "model", text), "config", None)
    return getattr(config, "num_hidden_layers", "?")
