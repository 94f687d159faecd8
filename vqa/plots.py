"""Figures of a :class:`~vqa.inference.Prediction`: the image under each image-attention map and
the question tokens shaded by each question-attention map. A prediction of a model with several
visual streams gets each stream's image under that stream's maps (``image/<stream>…``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor

from vqa.data.preprocess import ImageInput, open_image
from vqa.inference import Prediction

# Width of one character of the 9 pt monospace token labels, box padding included.
TOKEN_CHAR_INCHES = 0.085
# A question's images: one, or for a model of several visual streams one per stream, in stream
# order or by stream name (what vqa.inference.Predictor takes).
PredictionImages = ImageInput | Sequence[ImageInput] | Mapping[str, ImageInput]


class Panel(NamedTuple):
    """One image panel of the figure: the image drawn, the image-attention key drawn over it
    (None: the image alone) and, for a model of several streams, the image's stream."""

    image: ImageInput
    key: str | None
    stream: str | None = None


def image_panels(images: PredictionImages, prediction: Prediction) -> list[Panel]:
    """The figure's image panels in order: the image under each of a single-image
    prediction's maps; with ``prediction.streams``, stream by stream, the stream's image under
    each of its maps (``image/<stream>`` and ``image/<stream>/…``), or alone where the fusion
    block has no image map."""
    image_keys = [k for k in prediction.attention if k.startswith("image")]
    streams = prediction.streams
    if isinstance(images, Mapping):
        if streams and set(images) != set(streams):
            raise ValueError(f"images by stream name need {streams}, got {sorted(images)}")
        pictures = [images[s] for s in streams or images]
    elif isinstance(images, list | tuple):
        pictures = list(images)
    else:
        pictures = [images]
    if len(pictures) != len(streams or [None]):
        raise ValueError(
            f"the prediction is about {len(streams or [None])} image(s)"
            + (f" ({', '.join(streams)})" if streams else "")
            + f", got {len(pictures)}"
        )
    if not streams:
        return [Panel(pictures[0], key) for key in image_keys] or [Panel(pictures[0], None)]
    panels: list[Panel] = []
    for stream, picture in zip(streams, pictures, strict=True):
        own = [k for k in image_keys if k == f"image/{stream}" or k.startswith(f"image/{stream}/")]
        panels += [Panel(picture, key, stream) for key in own] or [Panel(picture, None, stream)]
    return panels


def plot_attention(image: PredictionImages, prediction: Prediction) -> Figure:
    """The image under each image-attention heatmap, and the question tokens shaded by each
    question-attention map. A plain ``Figure`` (Agg canvas), so no GUI backend is needed.

    ``image``: the question's image, or for a prediction with ``streams`` its images (in
    stream order or by stream name): one panel per stream image and map, titled with the map's
    key, which names the stream (``image/left: ...``)."""
    panels = image_panels(image, prediction)
    # the fusion block's order (e.g. word, phrase, sentence), not alphabetical
    question_keys = [k for k in prediction.attention if k.startswith("question")]
    columns = len(panels)
    token_row_inches = TOKEN_CHAR_INCHES * sum(len(t) + 2 for t in prediction.tokens) + 0.5
    fig = Figure(
        figsize=(max(3.2 * columns + 0.6, token_row_inches), 3.6 + 0.55 * len(question_keys)),
        layout="constrained",
    )
    grid = fig.add_gridspec(
        1 + len(question_keys), columns, height_ratios=[6] + [1] * len(question_keys)
    )
    answers = ", ".join(f"{a} ({s:.2f})" for a, s in prediction.answers[:3])
    labels = "".join(
        f" [{field}: {value}]" for field, value in (prediction.conditioning or {}).items()
    )
    fig.suptitle(f"Q: {prediction.question}{labels}\nA: {answers}", fontsize=10)

    opened: dict[int, np.ndarray] = {}  # each image decoded once, however many maps it has
    for col, (shown, key, stream) in enumerate(panels):
        if id(shown) not in opened:
            opened[id(shown)] = np.asarray(open_image(shown))
        picture = opened[id(shown)]
        height, width = picture.shape[:2]
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(picture, extent=(0, width, height, 0))
        if key is None and stream is not None:
            ax.set_title(f"{stream} image (no attention map)", fontsize=9)
        if key is not None:
            weights = prediction.attention[key].numpy()
            # Each grid cell covers its share of the whole image: the model resizes, never crops.
            heat = ax.imshow(
                weights,
                cmap="inferno",
                alpha=0.55,
                extent=(0, width, height, 0),
                interpolation="bilinear",
                norm=_contrast(weights),
            )
            # An inset colorbar keeps the image centred (a layout-managed one pushes it aside).
            fig.colorbar(heat, cax=ax.inset_axes((1.04, 0.0, 0.05, 1.0)))
            ax.set_title(
                f"{key}: {weights.shape[0]}x{weights.shape[1]} grid, {_peak(weights)}", fontsize=9
            )
        ax.set_axis_off()

    for row, key in enumerate(question_keys, start=1):
        ax = fig.add_subplot(grid[row, :])
        _shade_tokens(ax, prediction.tokens, prediction.attention[key])
        ax.set_title(f"{key}: {_peak(prediction.attention[key].numpy())}", fontsize=9, loc="left")
    return fig


def _contrast(weights: np.ndarray) -> Normalize:
    """Colours span the map's own range: a weakly peaked map still shows where it peaks (the
    colorbar and :func:`_peak` give the absolute scale)."""
    return Normalize(vmin=float(weights.min()), vmax=float(weights.max()))


def _peak(weights: np.ndarray) -> str:
    """How peaked a distribution is: its largest weight relative to a uniform one's."""
    return f"peak {float(weights.max()) * weights.size:.1f}x uniform"


def _shade_tokens(ax: Axes, tokens: Sequence[str], weights: Tensor) -> None:
    """Tokens in a row, each on a box shaded by its weight. A monospace font makes a token's
    width proportional to its length, so the boxes can be laid out without measuring text."""
    values = weights.numpy()
    shade = _contrast(values)
    cmap = colormaps["Reds"]
    widths = [len(t) + 2 for t in tokens]  # characters plus the gap between boxes
    starts = np.cumsum([0, *widths[:-1]])
    for token, start, width, value in zip(tokens, starts, widths, values, strict=True):
        ax.text(
            start + width / 2,
            0.5,
            token,
            ha="center",
            va="center",
            family="monospace",
            fontsize=9,
            color="white" if shade(value) > 0.6 else "black",
            bbox={"boxstyle": "round,pad=0.3", "facecolor": cmap(shade(value)), "edgecolor": "0.7"},
        )
    ax.set_xlim(-1, sum(widths) + 1)
    ax.set_ylim(0, 1)
    ax.set_axis_off()


def save_attention_figure(
    image: PredictionImages, prediction: Prediction, path: str | Path
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_attention(image, prediction).savefig(path, dpi=120)
    return path
