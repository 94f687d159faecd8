"""The demo page (`python -m vqa.cli.demo`, :mod:`vqa.demo`): its actions as plain functions on a
tiny checkpoint (answers, overlay, word shading, views, bad input, loading another checkpoint),
the entry point, and the page itself in a real browser (Chromium driven by Playwright).

The browser test doubles as the maker of the README screenshot:

    VQA_DEMO_CKPT=logs/quickstart/.../epoch_031.ckpt VQA_DEMO_SCREENSHOT=notebooks/figures/demo.png \\
        .venv/bin/python -m pytest -q -p no:xdist -m slow tests/test_demo.py -k browser

(``VQA_DEMO_IMAGE`` / ``VQA_DEMO_QUESTION`` pick the image and question shown.)
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

pytest.importorskip("gradio", reason="the demo needs the `demo` extra (gradio)")

from gradio.data_classes import ImageData

from tests.tiny_checkpoint import TinyRun, tiny_run
from vqa.cli import demo as vqa_demo
from vqa.demo import (
    EMPTY_QUESTION,
    MIN_SIDE,
    NO_CHECKPOINT,
    NO_IMAGE,
    UNIFORM_SHADE,
    AttentionView,
    DemoApp,
    UnreadableImage,
    attention_overlay,
    attention_views,
    build_demo,
    checkpoint_examples,
    free_port,
    image_input,
    launch_demo,
    render,
)
from vqa.inference import Prediction, Predictor

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
# This machine's network is closed: nothing may wait on Google services or QUIC probes.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
README_QUESTION = "how many red shapes are there?"


@pytest.fixture(scope="module")
def app(run: TinyRun) -> DemoApp:
    return DemoApp(Predictor.from_checkpoint(run.ckpt))


@pytest.fixture(scope="module")
def reference(run: TinyRun) -> Predictor:
    """A predictor of its own (own feature cache): what the page must agree with."""
    return Predictor.from_checkpoint(run.ckpt)


def val_question(run: TinyRun, index: int = 0) -> tuple[Path, str]:
    question = run.questions("val2014")[index]
    return run.image("val2014", question["image_id"]), question["question"]


def upload(path: Path) -> Image.Image:
    """The image as the page hands it over: a PIL image freshly decoded from the upload."""
    return image_input(type="pil", image_mode="RGB").preprocess(
        ImageData(path=str(path), orig_name=path.name)
    )


# --------------------------------------------------------------------------- handler functions


def test_answers_overlay_and_word_shading(run: TinyRun, app: DemoApp, reference: Predictor) -> None:
    image, question = val_question(run)
    answer = app.ask(upload(image), question)
    expected = reference.predict(image, question)

    assert not answer.error
    assert list(answer.scores) == [a for a, _ in expected.answers]
    assert list(answer.scores.values()) == pytest.approx([s for _, s in expected.answers], abs=1e-5)
    assert len(answer.scores) == 5
    assert f"**{expected.answer}**" in answer.status
    # one view: the parallel block's single image and question maps
    assert answer.views == [AttentionView("", "image", "question")]
    shown = answer.rendering
    # the heat map is blended over the picture, drawn large enough to see the grid
    picture = Image.open(image).convert("RGB").resize(shown.overlay.size, Image.Resampling.BICUBIC)
    assert shown.overlay.mode == "RGB" and min(shown.overlay.size) >= MIN_SIDE
    difference = np.abs(np.asarray(shown.overlay, float) - np.asarray(picture, float)).mean(-1)
    assert difference.mean() > 10  # coloured everywhere ...
    assert difference.std() > 1  # ... more where the model looked
    assert "4x4 grid" in shown.overlay_label
    # each token shaded by its weight relative to the top token's
    tokens, shades = zip(*shown.highlights, strict=True)
    assert list(tokens) == expected.tokens
    weights = expected.attention["question"]
    assert list(shades) == pytest.approx((weights / weights.max()).tolist(), abs=1e-3)
    assert max(shades) == 1.0


def test_a_follow_up_question_reuses_the_image_features(run: TinyRun, app: DemoApp) -> None:
    image, _ = val_question(run, 4)
    first = app.ask(upload(image), "how many shapes are there?")
    second = app.ask(upload(image), "what color is the square?")  # a new upload of the same file
    assert "cached image features" in second.status
    assert second.prediction.image_cached
    assert first.prediction.tokens != second.prediction.tokens


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no image", NO_IMAGE),
        ("empty question", EMPTY_QUESTION),
        ("blank question", EMPTY_QUESTION),
        ("too long question", "the question is too long"),
        ("upload of a text file", "'notes.txt' cannot be read as an image: not an image format"),
        ("truncated upload", "'broken.jpg' cannot be read as an image: corrupt or truncated"),
        ("path to a text file", "cannot be read as an image"),
        ("missing file", "image not found"),
    ],
)
def test_bad_input_gets_a_message(
    run: TinyRun, app: DemoApp, tmp_path: Path, case: str, expected: str
) -> None:
    image, question = val_question(run)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(image.read_bytes()[:200])
    inputs = {
        "no image": (None, question),
        "empty question": (upload(image), ""),
        "blank question": (upload(image), "   "),
        "too long question": (upload(image), " ".join(["red"] * 40)),
        "upload of a text file": (upload(notes), question),
        "truncated upload": (upload(broken), question),
        "path to a text file": (str(notes), question),
        "missing file": (str(tmp_path / "gone.png"), question),
    }[case]
    if case.endswith("upload"):
        assert isinstance(inputs[0], UnreadableImage)
    answer = app.ask(*inputs)
    assert answer.error and answer.prediction is None and answer.rendering is None
    assert answer.status.startswith("**Cannot answer:**")
    assert expected.lower() in answer.status.replace("\\", "").lower()
    assert "Traceback" not in answer.status


def test_an_unexpected_error_is_raised_and_logged(
    run: TinyRun, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only bad input becomes a message: a bug propagates (Gradio shows its generic error) and
    is logged with its traceback."""
    predictor = Predictor.from_checkpoint(run.ckpt)

    def broken(*_: object, **__: object) -> Prediction:
        raise RuntimeError("a bug")

    monkeypatch.setattr(predictor, "predict", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        DemoApp(predictor).ask(upload(val_question(run)[0]), "what color is the circle?")
    on_ask = next(f.fn for f in build_demo(predictor).fns.values() if f.name == "on_ask")
    with pytest.raises(RuntimeError, match="a bug"), caplog.at_level("ERROR", logger="vqa.demo"):
        on_ask(upload(val_question(run)[0]), "what color is the circle?")
    assert "the demo page failed in on_ask" in caplog.text and "RuntimeError: a bug" in caplog.text


def test_a_checkpoint_of_another_vocabulary_keeps_the_current_model(
    run: TinyRun, tmp_path: Path
) -> None:
    app = DemoApp(Predictor.from_checkpoint(run.ckpt))
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    tampered = copy.deepcopy(checkpoint)
    for answers in (
        tampered["hyper_parameters"]["answer_vocab"],
        tampered["hyper_parameters"]["data_artifacts"]["answer_vocab"],
    ):
        answers.append("an extra answer")
    other = tmp_path / "other_vocab.ckpt"
    torch.save(tampered, other)
    image, question = val_question(run)
    before = app.ask(upload(image), question)

    message, loaded = app.load(str(other))
    assert not loaded
    assert message.startswith("**Could not load the checkpoint** (still answering with")
    assert "answer head has" in message and "answer vocabulary has" in message
    assert app.predictor.trained.path == run.ckpt
    after = app.ask(upload(image), question)
    assert not after.error and after.scores == before.scores

    for path, words in [
        ("", NO_CHECKPOINT),
        (str(tmp_path / "missing.ckpt"), "checkpoint not found"),
        (str(tmp_path), "is a folder, not a checkpoint file"),
    ]:
        message, loaded = app.load(path)
        assert not loaded and words in message.replace("\\", "")
    message, loaded = app.load(str(run.ckpt))
    assert loaded and app.predictor.trained.path == run.ckpt

    # the page's Load button: the message in the status line, the model line unchanged
    demo = build_demo(app.predictor)
    on_load = next(f.fn for f in demo.fns.values() if f.name == "on_load")
    status, model_info = on_load(str(other))
    assert status.startswith("**Could not load the checkpoint**")
    assert model_info == demo.vqa_app.describe() and run.ckpt.name in model_info


def fake_prediction(attention: dict[str, torch.Tensor], tokens: int = 5) -> Prediction:
    return Prediction(
        question="what color is the circle?",
        tokens=[f"t{i}" for i in range(tokens)],
        answers=[("red", 0.9), ("blue", 0.1)],
        attention=attention,
    )


def test_every_map_of_a_multi_level_block_is_a_view() -> None:
    """Hierarchical (word/phrase/sentence) and chain-of-thought (stage0, stage1, ...) blocks give
    several maps: one selectable view each, image and question maps paired by name."""
    grid = torch.rand(3, 3).softmax(-1)
    words = torch.rand(5).softmax(-1)
    levels = ("word", "phrase", "sentence")
    prediction = fake_prediction(
        {
            f"{m}/{name}": grid if m == "image" else words
            for name in levels
            for m in ("image", "question")
        }
    )
    picture = Image.new("RGB", (64, 48), "gray")
    views = attention_views(prediction.attention)
    assert [v.name for v in views] == list(levels)
    assert views[1] == AttentionView("phrase", "image/phrase", "question/phrase")
    shown = render(picture, prediction, views[1])
    assert shown.overlay_label.startswith("Image attention (phrase): 3x3 grid")
    assert shown.highlights_label.startswith("Question attention (phrase)")
    assert shown.overlay.size == (MIN_SIDE, MIN_SIDE * 48 // 64)  # aspect kept

    chain = fake_prediction({"image/stage0": grid, "image/stage1": grid, "question/stage0": words})
    stages = attention_views(chain.attention)
    assert stages[1] == AttentionView("stage1", "image/stage1", None)
    # a view without its own question map shows the unshaded tokens
    assert render(picture, chain, stages[1]).highlights[0] == ("t0", None)
    assert DemoApp.view(None, "stage1") is None


def test_the_page_offers_a_selector_for_several_maps(
    run: TinyRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's own callbacks: a block with several maps gets a visible level selector, and
    picking a level redraws the overlay and the shading from the stored answer."""
    predictor = Predictor.from_checkpoint(run.ckpt)
    levels = ("word", "phrase", "sentence")
    maps = {name: torch.rand(4, 4).softmax(-1) for name in levels}
    words = {name: torch.rand(5).softmax(-1) for name in levels}
    attention = {}
    for name in levels:
        attention[f"image/{name}"], attention[f"question/{name}"] = maps[name], words[name]
    monkeypatch.setattr(predictor, "predict", lambda *_, **__: fake_prediction(attention))
    demo = build_demo(predictor)
    callbacks = {f.name: f.fn for f in demo.fns.values()}
    image, question = val_question(run)

    status, scores, selector, overlay, shading, answer = callbacks["on_ask"](
        upload(image), question
    )
    assert scores == {"red": 0.9, "blue": 0.1} and "**red**" in status
    assert selector.visible and [c[0] for c in selector.choices] == list(levels)
    assert selector.value == "word" and overlay.label.startswith("Image attention (word)")
    overlay, shading = callbacks["on_view"](answer, "sentence")
    assert overlay.label.startswith("Image attention (sentence): 4x4 grid")
    expected = (words["sentence"] / words["sentence"].max()).tolist()
    assert [t["class_or_confidence"] for t in shading.value] == pytest.approx(expected, abs=1e-3)

    # a failed question clears the answer and hides the selector
    status, scores, selector, overlay, shading, answer = callbacks["on_ask"](None, question)
    assert NO_IMAGE in status.replace("\\", "") and scores is None and answer is None
    assert not selector.visible and overlay.value is None


def test_uniform_maps_are_said_to_be_uniform() -> None:
    """Late fusion's image map and FiLM's question map are uniform: no heat map, light shade."""
    prediction = fake_prediction(
        {"image": torch.full((4, 4), 1 / 16), "question": torch.full((5,), 0.2)}
    )
    picture = Image.new("RGB", (128, 128), (10, 200, 30))
    shown = render(picture, prediction, attention_views(prediction.attention)[0])
    assert "uniform" in shown.overlay_label and "uniform" in shown.highlights_label
    assert np.asarray(shown.overlay)[0, 0].tolist() == [10, 200, 30]  # the picture alone
    assert {shade for _, shade in shown.highlights} == {UNIFORM_SHADE}
    assert attention_overlay(picture, None).size == (MIN_SIDE, MIN_SIDE)


def test_examples_come_from_the_checkpoints_validation_data(run: TinyRun, app: DemoApp) -> None:
    examples = checkpoint_examples(app.predictor.trained, 3)
    assert len(examples) == 3
    by_image: dict[int, list[str]] = {}
    for q in run.questions("val2014"):
        by_image.setdefault(q["image_id"], []).append(q["question"])
    for example in examples:
        assert example.image.parent == run.image("val2014", 0).parent and example.image.is_file()
        assert example.question in by_image[int(example.image.stem.rsplit("_", 1)[-1])]


def test_cli_serves_the_page_of_the_checkpoint(
    run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = {}

    def fake_launch(demo, **kwargs):
        served.update(kwargs, demo=demo)
        return "http://127.0.0.1:0/"

    monkeypatch.setattr("vqa.demo.launch_demo", fake_launch)
    argv = [
        "vqa.cli.demo",
        f"ckpt_path={run.ckpt}",
        "examples.count=2",
        f"hydra.run.dir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    vqa_demo.main()
    GlobalHydra.instance().clear()
    assert served["host"] == "127.0.0.1" and served["port"] is None and served["share"] is False
    assert len(served["examples"]) == 2
    assert served["demo"].vqa_app.predictor.trained.path == run.ckpt

    monkeypatch.setattr(sys, "argv", [*argv[:1], f"ckpt_path={tmp_path / 'nope.ckpt'}", argv[-1]])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        vqa_demo.main()
    GlobalHydra.instance().clear()


# --------------------------------------------------------------------------- the page in a browser


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium (/usr/bin/chromium or `chromium` on PATH) to drive the demo page: "
    "`apt-get install -y chromium` (make test-full tries it)",
)
def test_the_page_answers_in_a_real_browser(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    expect.set_options(timeout=60_000)  # a shared machine: answers may take a few seconds
    start = time.perf_counter()
    ckpt = Path(os.environ.get("VQA_DEMO_CKPT") or tiny_run(tmp_path_factory).ckpt)
    predictor = Predictor.from_checkpoint(ckpt)
    reference = Predictor.from_checkpoint(ckpt)
    examples = checkpoint_examples(predictor.trained, 4)
    image = Path(os.environ.get("VQA_DEMO_IMAGE") or examples[0].image)
    question = os.environ.get("VQA_DEMO_QUESTION") or README_QUESTION
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    disguised = tmp_path / "notes.png"
    disguised.write_text("not a picture either\n")

    demo = build_demo(predictor, examples)
    url = launch_demo(demo, port=free_port(), block=False, examples=examples)
    outside: list[str] = []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.set_default_timeout(60_000)

                def local_only(route) -> None:
                    if route.request.url.startswith(url):
                        route.continue_()
                    else:  # a closed network: fail fast instead of waiting
                        outside.append(route.request.url)
                        route.abort()

                page.route("**/*", local_only)
                page.goto(url)
                status = page.locator("#status")
                question_box = page.locator("#question").get_by_role("textbox")
                file_input = page.locator("#image input[type=file]")

                # no image yet: a message, not an error
                question_box.fill(question)
                page.locator("#ask").click()
                expect(status).to_contain_text("Upload an image")
                # a file that is not an image: Gradio's page refuses it by type ...
                file_input.set_input_files(notes)
                toast = page.get_by_test_id("toast-body")
                expect(toast).to_contain_text("Invalid file type: notes.txt")
                toast.get_by_test_id("toast-close").click()
                expect(toast).to_have_count(0)
                # ... and one named like an image reaches the server, which says what is wrong
                file_input.set_input_files(disguised)
                page.locator("#ask").click()
                expect(status).to_contain_text("notes.png")
                expect(status).to_contain_text("cannot be read as an image")
                page.locator("#image button[aria-label='Remove Image']").click()

                # the real thing
                file_input.set_input_files(image)
                expect(page.locator("#image img").first).to_be_visible()
                page.locator("#ask").click()
                expected = reference.predict(image, question)
                expect(page.locator("#answers [data-testid=label-output-value]")).to_have_text(
                    expected.answer
                )
                expect(status).to_contain_text("image encoded")
                assert page.locator("#answers dt").all_inner_texts() == [
                    a for a, _ in expected.answers
                ]
                page.wait_for_function(
                    "() => { const img = document.querySelector('#overlay img');"
                    " return img !== null && img.complete && img.naturalWidth > 0; }"
                )
                overlay_width = page.locator("#overlay img").evaluate("img => img.naturalWidth")
                assert overlay_width >= MIN_SIDE
                assert page.locator("#words .text").all_inner_texts() == expected.tokens
                page.mouse.move(0, 0)  # no hover highlight in the screenshot
                shot = tmp_path / "demo.png"
                page.screenshot(path=str(shot), full_page=True)
                if target := os.environ.get("VQA_DEMO_SCREENSHOT"):
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shot, target)

                # a follow-up question (Enter) about the same image: its features are cached
                follow_up = "what color is the square?"
                question_box.fill(follow_up)
                question_box.press("Enter")
                expect(status).to_contain_text("cached image features")
                expect(page.locator("#answers [data-testid=label-output-value]")).to_have_text(
                    reference.predict(image, follow_up).answer
                )

                # an example fills in its image and question
                example = examples[1]
                page.get_by_text(example.question, exact=True).click()
                expect(question_box).to_have_value(example.question)
                page.locator("#ask").click()
                expect(status).to_contain_text("image encoded")
                expect(page.locator("#answers [data-testid=label-output-value]")).to_have_text(
                    reference.predict(example.image, example.question).answer
                )
            finally:
                browser.close()
    finally:
        demo.close()
    with Image.open(shot) as png:
        assert png.width == 1280 and png.height > 900
    print(f"browser test: {time.perf_counter() - start:.1f} s; blocked requests: {outside}")
