"""The predictor's image-feature cache: the same logits with and without it (single- and
multi-stage fusion blocks), hits for the same picture however it arrives, misses for another,
LRU eviction, and concurrent calls that answer as sequential ones do."""

from __future__ import annotations

import dataclasses
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from tests.helpers import TINY_OVERRIDES, compose_config
from tests.tiny_checkpoint import CHECKPOINT_OVERRIDES, TinyRun
from vqa.checkpoint import TrainedModel, build_model, load_checkpoint
from vqa.inference import (
    CacheStats,
    Predictor,
    image_digest,
    packed_linear_available,
    read_image,
)
from vqa.models.packed_linear import PackedLinear

# cot attends over every listed stage: two of them exercise the multi-stage path.
FUSIONS = {
    "film": [],
    "parallel": [],
    "hierarchical": [],
    "cot": ["model.visual.stages=[layer2,layer3]"],
}


@pytest.fixture(scope="module")
def trained(run: TinyRun) -> TrainedModel:
    return load_checkpoint(run.ckpt)


def with_fusion(trained: TrainedModel, fusion: str) -> TrainedModel:
    """The checkpoint's data side (tokenizer, answers, image size) with a freshly initialised
    model of another fusion block: the cache must not change its logits either."""
    cfg = compose_config(
        "train", [*TINY_OVERRIDES, *CHECKPOINT_OVERRIDES, f"fusion={fusion}", *FUSIONS[fusion]]
    )
    GlobalHydra.instance().clear()
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    model = build_model(
        model_config,
        num_answers=len(trained.answer_vocab),
        vocab_size=len(trained.tokenizer),
    ).eval()
    return dataclasses.replace(
        trained, model=model, run_config={**trained.run_config, "model": model_config}
    )


def rows(run: TinyRun, count: int) -> list[tuple[Path, str]]:
    """(image, question) pairs of the validation split, several questions per image."""
    return [
        (run.image("val2014", q["image_id"]), q["question"])
        for q in run.questions("val2014")[:count]
    ]


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_cache_gives_the_logits_of_the_uncached_path_and_of_the_model(
    run: TinyRun, trained: TrainedModel, fusion: str
) -> None:
    model = with_fusion(trained, fusion)
    cached, uncached = Predictor(model, cache_size=8), Predictor(model, cache_size=0)
    pairs = rows(run, 8)  # two images, four questions each
    assert len({image for image, _ in pairs}) == 2
    first, second = pairs[0][0], pairs[4][0]
    calls = [
        ([first], [pairs[0][1]]),  # miss
        ([first], [pairs[1][1]]),  # follow-up: hit
        ([first, second, first], [pairs[2][1], pairs[4][1], pairs[3][1]]),  # hit, miss, hit
        ([second, second], [pairs[5][1], pairs[6][1]]),  # hits
    ]
    expected_cached = [[False], [True], [True, False, True], [True, True]]
    for (images, questions), hits in zip(calls, expected_cached, strict=True):
        got = cached.run(images, questions)
        want = uncached.run(images, questions)
        assert got.image_cached == hits and not any(want.image_cached)
        torch.testing.assert_close(got.output.logits, want.output.logits, rtol=0, atol=0)
        for key, value in want.output.attention.items():
            torch.testing.assert_close(got.output.attention[key], value, rtol=0, atol=0)
        # one question about one image: exactly VQAModel.forward on the encoded batch
        if len(images) == 1:
            batch = cached.encode(images, questions)
            with torch.inference_mode():
                direct = model.model(**batch.model_inputs()).logits
            torch.testing.assert_close(got.output.logits, direct, rtol=0, atol=0)
    # one lookup per distinct image of a call
    assert cached.cache_stats() == CacheStats(hits=3, misses=2, size=2, capacity=8)
    assert uncached.cache_stats() == CacheStats(hits=0, misses=5, size=0, capacity=0)


def test_same_picture_hits_however_it_arrives_another_misses(run: TinyRun, trained) -> None:
    predictor = Predictor(trained)
    (path, question), (other, _) = rows(run, 1)[0], rows(run, 5)[4]
    assert path != other
    with Image.open(path) as img:
        pil = img.copy()
    forms = [path, str(path), path.read_bytes(), pil, pil.convert("RGBA"), np.asarray(pil)]
    answers = [predictor.predict(form, question) for form in forms]
    assert [a.image_cached for a in answers] == [False] + [True] * (len(forms) - 1)
    assert all(a.answers == answers[0].answers for a in answers)
    # the same picture re-encoded losslessly is still the same pixels
    png = io.BytesIO()
    pil.save(png, format="PNG")
    assert predictor.predict(png.getvalue(), question).image_cached
    assert predictor.cache_stats().misses == 1
    # another picture, and the same one changed by a single pixel, are new images
    assert not predictor.predict(other, question).image_cached
    changed = pil.copy()
    changed.putpixel((0, 0), tuple(255 - c for c in pil.getpixel((0, 0))))
    assert image_digest(read_image(changed)) != image_digest(read_image(pil))
    assert not predictor.predict(changed, question).image_cached
    assert predictor.cache_stats() == CacheStats(
        hits=len(forms), misses=3, size=3, capacity=predictor.cache.capacity
    )


def test_least_recently_used_image_is_dropped(run: TinyRun, trained: TrainedModel) -> None:
    predictor = Predictor(trained, cache_size=2)
    pairs = rows(run, 12)
    a, b, c = (pairs[i] for i in (0, 4, 8))
    assert len({a[0], b[0], c[0]}) == 3
    for image, question in (a, b, a, c):  # c evicts b, the least recently used
        predictor.predict(image, question)
    assert predictor.cache_stats() == CacheStats(hits=1, misses=3, size=2, capacity=2)
    assert predictor.predict(*a).image_cached
    assert not predictor.predict(*b).image_cached
    predictor.clear_cache()
    assert predictor.cache_stats() == CacheStats(hits=0, misses=0, size=0, capacity=2)
    with pytest.raises(ValueError, match="cache_size"):
        Predictor(trained, cache_size=-1)


def test_concurrent_calls_answer_as_sequential_ones(run: TinyRun, trained: TrainedModel) -> None:
    pairs = rows(run, 16) * 3  # four images, each asked about from several threads
    sequential = Predictor(trained, cache_size=0)
    expected = [sequential.run([image], [question]).output for image, question in pairs]
    shared = Predictor(trained)
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda pair: shared.run([pair[0]], [pair[1]]).output, pairs))
    for want, out in zip(expected, got, strict=True):
        torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
        for key, value in want.attention.items():
            torch.testing.assert_close(out.attention[key], value, rtol=0, atol=0)
    stats = shared.cache_stats()
    # every call looked its image up once; two threads may both miss on a new image
    assert stats.lookups == len(pairs) and stats.size == 4
    assert 4 <= stats.misses <= 4 * 4 and stats.hits >= len(pairs) - 16


# ------------------------------------------------------------------------------- packed linear

needs_packed = pytest.mark.skipif(not packed_linear_available(), reason="needs MKL")
PACKED_ATOL = 1e-4  # packed vs plain fp32 linear layers: float rounding only (about 1e-6)


@needs_packed
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_packed_linear_gives_the_plain_logits_within_rounding(
    run: TinyRun, trained: TrainedModel, fusion: str
) -> None:
    model = with_fusion(trained, fusion)
    plain = Predictor(model, cache_size=0)
    packed = Predictor(model, cache_size=8, cpu_packed_linear=True)
    packed_uncached = Predictor(model, cache_size=0, cpu_packed_linear=True)
    assert packed.packed_linears > 0 and plain.packed_linears == 0
    # the TrainedModel's own model is left plain
    assert packed.model is not model.model
    assert not any(isinstance(m, PackedLinear) for m in model.model.modules())
    pairs = rows(run, 8)
    images, questions = [p[0] for p in pairs], [p[1] for p in pairs]
    for batch in ([0], [1], [2, 4, 3], [5, 6], list(range(8))):
        ims, qs = [images[i] for i in batch], [questions[i] for i in batch]
        want = plain.run(ims, qs).output
        got = packed.run(ims, qs)
        torch.testing.assert_close(got.output.logits, want.logits, rtol=0, atol=PACKED_ATOL)
        assert torch.equal(got.output.logits.argmax(-1), want.logits.argmax(-1))
        for key, value in want.attention.items():
            torch.testing.assert_close(got.output.attention[key], value, rtol=0, atol=PACKED_ATOL)
        # under the option the cache still changes nothing
        nocache = packed_uncached.run(ims, qs).output
        torch.testing.assert_close(got.output.logits, nocache.logits, rtol=0, atol=0)
        for key, value in nocache.attention.items():
            torch.testing.assert_close(got.output.attention[key], value, rtol=0, atol=0)
    assert packed.cache_stats().hits > 0
    answers = [packed.predict(i, q).answers[0][0] for i, q in pairs]
    assert answers == [plain.predict(i, q).answers[0][0] for i, q in pairs]


def test_packed_linear_is_a_no_op_without_cpu_mkl(
    trained: TrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vqa.inference.packed_linear_available", lambda: False)
    with pytest.warns(UserWarning, match="cpu_packed_linear"):
        predictor = Predictor(trained, cpu_packed_linear=True)
    assert predictor.packed_linears == 0 and predictor.model is trained.model
    assert not any(isinstance(m, PackedLinear) for m in predictor.model.modules())
