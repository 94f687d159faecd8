"""An interactive page for a trained checkpoint: ask questions about an image, see the top answers,
where the model looked (image attention blended over the picture) and which question words it
weighed (question attention), for every map the fusion block gives.

    python -m vqa.cli.demo ckpt_path=CKPT        (or: make demo CKPT=...)

:func:`build_demo` builds the Gradio page around a :class:`~vqa.inference.Predictor`;
:class:`DemoApp` holds what the page does (answer, render a map, load another checkpoint) as plain
functions of plain values, so they are tested without a browser. Every question goes through
``Predictor.predict`` with the image as the page holds it, the same pixels each time, so a
follow-up question about an image reuses the predictor's cached image features.

Bad input (no image, a file that is not an image, an empty or too long question, a checkpoint
that does not load) becomes a message in the page's status line: only the expected exception
types are caught (:class:`~vqa.inference.InputError`, :class:`~vqa.checkpoint.CheckpointError`,
``OSError``); anything else is a bug, raised so that Gradio logs it with its traceback.

The page asks about one image: a checkpoint of several images per question (``data.streams``)
is refused (:func:`require_one_image`); use ``python -m vqa.cli.predict`` for those.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# No telemetry or version check from Gradio: a demo must work on a closed network, without
# waiting on one. Set before gradio is imported (it reads the variable on Blocks creation).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
from matplotlib import colormaps
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from vqa.checkpoint import CheckpointError, TrainedModel
from vqa.data.preprocess import ImageInput, open_image
from vqa.inference import InputError, Prediction, Predictor, RawImage, read_image

log = logging.getLogger(__name__)

# The heat map of vqa.plots.plot_attention: the same colours, blended as strongly over the image.
OVERLAY_CMAP = "inferno"
OVERLAY_ALPHA = 0.55
# Overlays are drawn at least this many pixels on their longer side (the synthetic images are
# 128 px) and at most MAX_SIDE (a large photo needs no more to show a coarse grid).
MIN_SIDE = 384
MAX_SIDE = 768
# A map whose weights vary less than this is uniform: there is nothing to show over the image.
UNIFORM_SPREAD = 1e-6
# How a uniform question map shades every token (light: no token stands out).
UNIFORM_SHADE = 0.2

NO_IMAGE = "Upload an image, or pick one of the examples below, first."
EMPTY_QUESTION = "Type a question about the image."
NO_CHECKPOINT = "Type the path of a checkpoint (.ckpt) to load."
VIEW_LABEL = "Attention map"
UNKNOWN_FORMAT = "not an image format that can be read (PNG, JPEG, GIF, BMP, WebP, ...)"


def _escape(text: str) -> str:
    """``text`` shown literally in Markdown (paths hold underscores, messages brackets)."""
    for char in "\\`*_[]<>#|":
        text = text.replace(char, "\\" + char)
    return text


# ---------------------------------------------------------------------------------------------
# Rendering a prediction


@dataclass(frozen=True)
class AttentionView:
    """One selectable view: the image map and the question map of one level or stage."""

    name: str  # "" where the block gives a single map of each
    image_key: str | None
    question_key: str | None


def attention_views(attention: Mapping[str, Tensor]) -> list[AttentionView]:
    """The views of a prediction's maps, in the fusion block's order: ``image``/``question``
    give one view; ``image/word``, ``question/word``, ``image/phrase``, ... one per level (or
    ``image/stage0``, ... one per reasoning stage). A level without its own map of one modality
    shows the block's unnamed map of it, if any."""
    names: dict[str, dict[str, str]] = {}
    for key in attention:
        modality, _, name = key.partition("/")
        if modality in ("image", "question"):
            names.setdefault(name, {})[modality] = key
    shared = names.get("", {})
    return [
        AttentionView(
            name,
            keys.get("image", shared.get("image")),
            keys.get("question", shared.get("question")),
        )
        for name, keys in names.items()
        if name or len(names) == 1
    ] or [AttentionView("", None, None)]


def _peak(weights: np.ndarray) -> float:
    """How peaked a distribution is: its largest weight relative to a uniform one's."""
    return float(weights.max()) * weights.size / max(float(weights.sum()), 1e-12)


def _display_size(width: int, height: int) -> tuple[int, int]:
    longer = max(width, height)
    scale = min(max(1.0, MIN_SIDE / longer), MAX_SIDE / longer) if longer else 1.0
    return max(1, round(width * scale)), max(1, round(height * scale))


def attention_overlay(image: ImageInput, weights: Tensor | np.ndarray | None) -> Image.Image:
    """The picture with an image-attention map [H, W] (over the model's grid, which covers the
    whole image: the model resizes, never crops) blended over it as a heat map, colours spanning
    the map's own range as in :func:`vqa.plots.plot_attention`. Without a map, or with a uniform
    one, the picture alone."""
    picture = open_image(image)
    picture = picture.resize(_display_size(*picture.size), Image.Resampling.BICUBIC)
    if weights is None:
        return picture
    heat = np.asarray(weights, dtype=np.float32)
    heat = heat.reshape(-1, *heat.shape[-2:]).mean(axis=0)  # heads, if any, averaged
    low, high = float(heat.min()), float(heat.max())
    if high - low < UNIFORM_SPREAD:
        return picture
    scaled = Image.fromarray((heat - low) / (high - low), mode="F").resize(
        picture.size, Image.Resampling.BILINEAR
    )
    colours = colormaps[OVERLAY_CMAP](np.clip(np.asarray(scaled), 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - OVERLAY_ALPHA) * np.asarray(
        picture, dtype=np.float32
    ) + OVERLAY_ALPHA * colours
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def token_highlights(
    tokens: Sequence[str], weights: Tensor | np.ndarray | None
) -> list[tuple[str, float | None]]:
    """(token, shade) pairs for ``gr.HighlightedText``: each token's attention weight relative to
    the largest one (1.0: the token the model weighed most); a light :data:`UNIFORM_SHADE` for
    all where the weights are equal (a block that averages the words), None without a map."""
    if weights is None:
        return [(token, None) for token in tokens]
    values = np.asarray(weights, dtype=np.float64)
    if values.size == 0 or float(values.max() - values.min()) < UNIFORM_SPREAD:
        return [(token, UNIFORM_SHADE) for token in tokens]
    top = float(values.max())
    return [(token, round(float(w) / top, 4)) for token, w in zip(tokens, values, strict=True)]


@dataclass
class Rendering:
    """What the page shows of one view of a prediction."""

    overlay: Image.Image
    overlay_label: str
    highlights: list[tuple[str, float | None]]
    highlights_label: str


def render(image: ImageInput, prediction: Prediction, view: AttentionView) -> Rendering:
    where = f" ({view.name})" if view.name else ""
    if view.image_key is None:
        overlay, overlay_label = attention_overlay(image, None), "Image (no image attention)"
    else:
        weights = prediction.attention[view.image_key]
        grid = "x".join(str(s) for s in weights.shape[-2:])
        spread = float(weights.max() - weights.min())
        overlay_label = f"Image attention{where}: {grid} grid, " + (
            "uniform" if spread < UNIFORM_SPREAD else f"peak {_peak(weights.numpy()):.1f}x uniform"
        )
        overlay = attention_overlay(image, weights)
    if view.question_key is None:
        highlights = token_highlights(prediction.tokens, None)
        highlights_label = "Question tokens (no question attention)"
    else:
        weights = prediction.attention[view.question_key]
        highlights = token_highlights(prediction.tokens, weights)
        if float(weights.max() - weights.min()) < UNIFORM_SPREAD:
            highlights_label = (
                f"Question attention{where}: uniform, each of the {weights.numel()} tokens "
                f"weighs {float(weights.max()):.2f} (this block does not weigh words)"
            )
        else:
            highlights_label = (
                f"Question attention{where}: darker = more weight, relative to the top "
                f"token's {float(weights.max()):.2f}"
            )
    return Rendering(overlay, overlay_label, highlights, highlights_label)


# ---------------------------------------------------------------------------------------------
# What the page does, without Gradio


@dataclass
class UnreadableImage:
    """An upload that is not a decodable image (what :func:`image_input` hands on instead)."""

    name: str
    reason: str

    @property
    def message(self) -> str:
        return f"the uploaded file {self.name!r} cannot be read as an image: {self.reason}."


def _sentence(text: str) -> str:
    """A message as a sentence: capitalised, full stop."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


@dataclass
class Answer:
    """The outcome of one question: a status line and, unless it failed, the prediction."""

    status: str
    error: bool = False
    image: Image.Image | None = None  # the picture as asked about (to re-render other views)
    prediction: Prediction | None = None
    views: list[AttentionView] = field(default_factory=list)
    rendering: Rendering | None = None

    @classmethod
    def failed(cls, message: str) -> Answer:
        return cls(status=f"**Cannot answer:** {_escape(_sentence(message))}", error=True)

    @property
    def scores(self) -> dict[str, float] | None:
        return None if self.prediction is None else dict(self.prediction.answers)


def describe(trained: TrainedModel, device: Any) -> str:
    """One Markdown line about the loaded model."""
    return (
        f"Model: `{trained.path.name}` ({_escape(str(trained.path.parent))}), "
        f"{trained.fusion_name}, {len(trained.answer_vocab)} answers, questions of up to "
        f"{trained.max_question_length} tokens ([CLS] and [SEP] included), on {device}"
    )


def require_one_image(trained: TrainedModel) -> None:
    """The page holds one image: :class:`CheckpointError` for a model that reads several per
    question."""
    streams = trained.streams
    if streams is not None and len(streams) > 1:
        raise CheckpointError(
            f"{trained.path} reads {len(streams)} images per question (streams "
            f"{', '.join(streams)}); the demo asks about one image. Use `python -m "
            f"vqa.cli.predict ckpt_path={trained.path} "
            f"image=[{','.join(f'<{stream} image>' for stream in streams)}] "
            'question="..."` instead'
        )


class DemoApp:
    """The page's actions on one shared :class:`Predictor` (thread-safe: Gradio answers
    several visitors at once). Loading a checkpoint swaps the predictor for every visitor; a
    question already running finishes with the model it started with. A checkpoint of several
    images per question is refused (:func:`require_one_image`)."""

    def __init__(self, predictor: Predictor, top_k: int = 5) -> None:
        require_one_image(predictor.trained)
        self._predictor = predictor
        self.top_k = top_k
        self._load_lock = threading.Lock()

    @property
    def predictor(self) -> Predictor:
        return self._predictor

    def describe(self) -> str:
        return describe(self._predictor.trained, self._predictor.device)

    def ask(self, image: RawImage | UnreadableImage | None, question: str | None) -> Answer:
        """Answer ``question`` about ``image`` (a PIL image, a path, ...: what
        :meth:`Predictor.predict` takes), or say why not."""
        if image is None:
            return Answer.failed(NO_IMAGE)
        if isinstance(image, UnreadableImage):
            return Answer.failed(image.message)
        question = (question or "").strip()
        if not question:
            return Answer.failed(EMPTY_QUESTION)
        predictor = self._predictor  # one model for the whole question, whatever loads meanwhile
        start = time.perf_counter()
        try:
            picture = read_image(image)
            prediction = predictor.predict(picture, question, top_k=self.top_k)
        except InputError as err:
            return Answer.failed(str(err))
        seconds = time.perf_counter() - start
        views = attention_views(prediction.attention)
        best, score = prediction.answers[0]
        features = "cached image features" if prediction.image_cached else "image encoded"
        return Answer(
            status=f"Answer: **{_escape(best)}** ({score:.2f}), in {seconds * 1000:.0f} ms "
            f"({features}) with `{predictor.trained.path.name}`.",
            image=picture,
            prediction=prediction,
            views=views,
            rendering=render(picture, prediction, views[0]),
        )

    @staticmethod
    def view(answer: Answer | None, name: str | None) -> Rendering | None:
        """The rendering of another view (level, stage) of an answer."""
        if answer is None or answer.prediction is None or answer.image is None:
            return None
        view = next((v for v in answer.views if v.name == name), answer.views[0])
        return render(answer.image, answer.prediction, view)

    def load(self, path: str | Path | None) -> tuple[str, bool]:
        """Switch to the checkpoint at ``path``: (status message, whether it loaded). A failure
        keeps the current model."""
        path = str(path or "").strip()
        if not path:
            return f"**Not loaded:** {NO_CHECKPOINT}", False
        current = self._predictor.trained.path.name
        with self._load_lock:  # one checkpoint in memory at a time besides the current one
            try:
                predictor = Predictor.from_checkpoint(
                    Path(path).expanduser(), self._predictor.device
                )
                require_one_image(predictor.trained)
            except (CheckpointError, OSError) as err:
                log.warning("checkpoint %s not loaded: %s", path, err)
                return (
                    f"**Could not load the checkpoint** (still answering with `{current}`): "
                    f"{_escape(str(err))}",
                    False,
                )
            self._predictor = predictor
        log.info("demo now answers with %s", predictor.trained.path)
        return f"Loaded `{predictor.trained.path.name}`: it answers from now on.", True


# ---------------------------------------------------------------------------------------------
# Example images


@dataclass(frozen=True)
class Example:
    image: Path
    question: str


def find_examples(root: str | Path, split: str, count: int) -> list[Example]:
    """Up to ``count`` images of a VQA v2 layout split (``root/Images/mscoco/<split>``), each with
    one of its questions (from ``root/Questions``; varied across images, so the examples show
    several question types), or "what is in the image?" without a questions file."""
    folder = Path(root) / "Images" / "mscoco" / split
    images = sorted(folder.glob("*.jpg"))[: max(0, count)] if folder.is_dir() else []
    questions: dict[int, list[str]] = {}
    questions_file = Path(root) / "Questions" / f"v2_OpenEnded_mscoco_{split}_questions.json"
    if images and questions_file.is_file():
        for item in json.loads(questions_file.read_text(encoding="utf-8"))["questions"]:
            questions.setdefault(int(item["image_id"]), []).append(item["question"])
    examples = []
    for index, path in enumerate(images):
        try:
            own = questions.get(int(path.stem.rsplit("_", 1)[-1]), [])
        except ValueError:
            own = []
        examples.append(Example(path, own[index % len(own)] if own else "what is in the image?"))
    return examples


def checkpoint_examples(
    trained: TrainedModel, count: int, split: str | None = None
) -> list[Example]:
    """Examples from the validation split (or ``split``) of the data the checkpoint was trained
    on, where that data is on this machine (the synthetic set is, after `make train`)."""
    data = trained.data_config
    root = data.get("root")
    split = split or data.get("val_split") or "val2014"
    return find_examples(root, split, count) if root else []


# ---------------------------------------------------------------------------------------------
# The page


def image_input(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` (``kwargs``) whose upload of a file PIL cannot decode reaches the handler as
    an :class:`UnreadableImage`, so that the page can say what is wrong instead of failing inside
    Gradio. (An instance attribute, not a subclass: Gradio writes a ``.pyi`` stub next to the
    module of every component class it sees defined.)"""
    image = gr.Image(**kwargs)
    image.preprocess = types.MethodType(_tolerant_preprocess, image)  # type: ignore[method-assign]
    return image


def _tolerant_preprocess(image: gr.Image, payload: Any) -> Any:
    try:
        return gr.Image.preprocess(image, payload)
    except UnidentifiedImageError:
        return UnreadableImage(_upload_name(payload), UNKNOWN_FORMAT)
    except OSError as err:  # truncated or corrupt data, a vanished temp file
        return UnreadableImage(_upload_name(payload), f"corrupt or truncated data ({err})")


def _upload_name(payload: Any) -> str:
    return str(getattr(payload, "orig_name", None) or Path(str(payload.path)).name)


CSS = """
#words { font-size: 1.05rem; }
"""


def build_demo(
    predictor: Predictor,
    examples: Sequence[Example] = (),
    top_k: int = 5,
    title: str = "coattn-vqa: ask about an image",
) -> gr.Blocks:
    """The demo page for ``predictor``; ``launch_demo`` (or ``Blocks.launch``) serves it."""
    app = DemoApp(predictor, top_k)

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        last = gr.State(None)  # the last Answer, to re-render it for another view
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                image = image_input(
                    type="pil",
                    image_mode="RGB",
                    sources=["upload", "clipboard"],
                    label="Image",
                    height=320,
                    elem_id="image",
                )
                question = gr.Textbox(
                    label="Question",
                    placeholder="e.g. how many red shapes are there?",
                    lines=1,
                    max_lines=1,
                    elem_id="question",
                )
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                status = gr.Markdown(
                    "Upload or pick an image, type a question, press Ask (or Enter).",
                    elem_id="status",
                )
            with gr.Column(scale=1):
                answers = gr.Label(num_top_classes=top_k, label="Top answers", elem_id="answers")
                view = gr.Radio(
                    choices=[], label=VIEW_LABEL, visible=False, elem_id="view", interactive=True
                )
                overlay = gr.Image(
                    type="pil",
                    label="Image attention",
                    interactive=False,
                    height=320,
                    elem_id="overlay",
                )
                words = gr.HighlightedText(
                    label="Question attention",
                    show_legend=False,
                    combine_adjacent=False,
                    elem_id="words",
                )
        if examples:
            gr.Examples(
                examples=[[str(e.image), e.question] for e in examples],
                inputs=[image, question],
                label="Examples (validation images of the checkpoint's data)",
                examples_per_page=len(examples),
            )
        with gr.Accordion("Model", open=False):
            model_info = gr.Markdown(app.describe(), elem_id="model-info")
            with gr.Row():
                ckpt = gr.Textbox(
                    label="Checkpoint",
                    value=str(predictor.trained.path),
                    scale=4,
                    elem_id="ckpt-path",
                )
                load = gr.Button("Load", scale=1, elem_id="load")

        def on_ask(picture: Any, text: str) -> tuple[Any, ...]:
            answer = app.ask(picture, text)
            shown = answer.rendering
            names = [v.name for v in answer.views]
            return (
                answer.status,
                answer.scores,
                gr.Radio(
                    choices=names,
                    value=names[0] if names else None,
                    visible=len(names) > 1,
                ),
                gr.Image(value=None if shown is None else shown.overlay, label=_label(shown, 0)),
                gr.HighlightedText(
                    value=None if shown is None else shown.highlights, label=_label(shown, 1)
                ),
                None if answer.error else answer,
            )

        def on_view(answer: Answer | None, name: str | None) -> tuple[Any, Any]:
            shown = DemoApp.view(answer, name)
            if shown is None:
                return gr.Image(), gr.HighlightedText()
            return (
                gr.Image(value=shown.overlay, label=shown.overlay_label),
                gr.HighlightedText(value=shown.highlights, label=shown.highlights_label),
            )

        def on_load(path: str) -> tuple[str, str]:
            message, _ = app.load(path)
            return message, app.describe()

        on_ask, on_view, on_load = _logged(on_ask), _logged(on_view), _logged(on_load)
        ask_outputs = [status, answers, view, overlay, words, last]
        ask.click(on_ask, inputs=[image, question], outputs=ask_outputs)
        question.submit(on_ask, inputs=[image, question], outputs=ask_outputs)
        view.input(on_view, inputs=[last, view], outputs=[overlay, words])
        load.click(on_load, inputs=[ckpt], outputs=[status, model_info])
        ckpt.submit(on_load, inputs=[ckpt], outputs=[status, model_info])
    demo.vqa_app = app  # type: ignore[attr-defined]  # the actions, for callers and tests
    return demo


def _logged(callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` with an unexpected exception (a bug, not bad input) logged with its traceback
    in the run's log before Gradio shows its generic error."""

    @functools.wraps(callback)
    def logged(*args: Any) -> Any:
        try:
            return callback(*args)
        except Exception:
            log.exception("the demo page failed in %s", callback.__name__)
            raise

    return logged


def _label(shown: Rendering | None, which: int) -> str:
    if shown is None:
        return ("Image attention", "Question attention")[which]
    return (shown.overlay_label, shown.highlights_label)[which]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def launch_demo(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
    examples: Sequence[Example] = (),
) -> str:
    """Serve ``demo`` on ``host:port`` (None: a free port) with nothing that needs the network
    (no share link unless asked, no telemetry, no MCP server, no server-side rendering);
    returns the local URL. ``block=False`` returns at once (tests); close with ``demo.close()``."""
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port or free_port(host),
        share=share,
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=False,
        inbrowser=False,
        mcp_server=False,
        ssr_mode=False,
        run_history=False,
        allowed_paths=sorted({str(e.image.parent.resolve()) for e in examples}),
        css=CSS,
    )
    return url
