"""Answer questions about images with a trained checkpoint, and draw what it attended to.

    python -m vqa.cli.predict ckpt_path=CKPT image=PATH question="what color is the circle?" \
        [top_k=5] [save_attention=out.png] [device=cuda]

Images and questions go through the checkpoint's own preprocessing (image size, tokenizer,
question length), so an answer here is the answer evaluation would score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import Tensor

from vqa.checkpoint import TrainedModel, load_checkpoint
from vqa.data.images import build_transform, load_rgb, to_rgb
from vqa.utils import apply_extras, set_project_root
from vqa.utils.project import CONFIG_DIR

ImageInput = Image.Image | str | Path
# Width of one character of the 9 pt monospace token labels, box padding included.
TOKEN_CHAR_INCHES = 0.085


@dataclass
class Prediction:
    """One question's top answers, its tokens and its attention maps (CPU tensors).

    ``attention`` keys are the fusion block's: ``image…`` maps are [H_s, W_s] over the grid,
    ``question…`` maps are [N] over ``tokens``.
    """

    question: str
    tokens: list[str]
    answers: list[tuple[str, float]]
    attention: dict[str, Tensor]

    @property
    def answer(self) -> str:
        return self.answers[0][0]


class Predictor:
    """Batched inference on raw images and question strings for a :class:`TrainedModel`."""

    def __init__(self, trained: TrainedModel, device: str | torch.device = "cpu") -> None:
        self.trained = trained
        self.device = torch.device(device)
        self.model = trained.model.to(self.device).eval()
        self.transform = build_transform(trained.image_size, augment=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        return cls(load_checkpoint(path), device)

    def encode(self, images: Sequence[ImageInput], questions: Sequence[str]) -> dict[str, Tensor]:
        """Model inputs, tokenised exactly like the training data (truncation, [CLS]/[SEP])."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        pixels = torch.stack([self.transform(_rgb(image)) for image in images])
        tokens = self.trained.tokenizer(
            list(questions),
            truncation=True,
            max_length=self.trained.max_question_length,
            padding=True,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {
            "images": pixels.to(self.device),
            "input_ids": tokens["input_ids"].to(self.device),
            "attention_mask": tokens["attention_mask"].to(self.device),
        }

    def scores(self, logits: Tensor) -> Tensor:
        """Per-answer scores in [0, 1]: sigmoids for a BCE-trained model (answers are scored
        independently, as its soft targets are), a softmax for a cross-entropy one."""
        return logits.sigmoid() if self.trained.loss == "bce" else logits.softmax(dim=-1)

    @torch.inference_mode()
    def predict_batch(
        self, images: Sequence[ImageInput], questions: Sequence[str], top_k: int = 5
    ) -> list[Prediction]:
        inputs = self.encode(images, questions)
        out = self.model(**inputs)
        top = self.scores(out.logits.float()).topk(min(top_k, out.logits.shape[1]), dim=-1)
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        vocab = self.trained.answer_vocab
        return [
            Prediction(
                question=question,
                tokens=self.trained.tokenizer.convert_ids_to_tokens(
                    inputs["input_ids"][i, : lengths[i]].tolist()
                ),
                answers=[
                    (vocab.decode(a), s)
                    for a, s in zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)
                ],
                # question maps are cut to the real tokens (padding holds zero weight)
                attention={
                    k: (v[i, : lengths[i]] if k.startswith("question") else v[i]).float().cpu()
                    for k, v in out.attention.items()
                },
            )
            for i, question in enumerate(questions)
        ]

    def predict(self, image: ImageInput, question: str, top_k: int = 5) -> Prediction:
        return self.predict_batch([image], [question], top_k)[0]


def _rgb(image: ImageInput) -> Image.Image:
    return to_rgb(image) if isinstance(image, Image.Image) else load_rgb(image)


def plot_attention(image: ImageInput, prediction: Prediction) -> Figure:
    """The image under each image-attention heatmap, and the question tokens shaded by each
    question-attention map. A plain ``Figure`` (Agg canvas), so no GUI backend is needed."""
    picture = np.asarray(_rgb(image))
    height, width = picture.shape[:2]
    # the fusion block's order (e.g. word, phrase, sentence), not alphabetical
    image_keys = [k for k in prediction.attention if k.startswith("image")]
    question_keys = [k for k in prediction.attention if k.startswith("question")]
    columns = max(1, len(image_keys))
    token_row_inches = TOKEN_CHAR_INCHES * sum(len(t) + 2 for t in prediction.tokens) + 0.5
    fig = Figure(
        figsize=(max(3.2 * columns + 0.6, token_row_inches), 3.6 + 0.55 * len(question_keys)),
        layout="constrained",
    )
    grid = fig.add_gridspec(
        1 + len(question_keys), columns, height_ratios=[6] + [1] * len(question_keys)
    )
    answers = ", ".join(f"{a} ({s:.2f})" for a, s in prediction.answers[:3])
    fig.suptitle(f"Q: {prediction.question}\nA: {answers}", fontsize=10)

    for col, key in enumerate(image_keys or [None]):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(picture, extent=(0, width, height, 0))
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


def save_attention_figure(image: ImageInput, prediction: Prediction, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_attention(image, prediction).savefig(path, dpi=120)
    return path


def print_prediction(prediction: Prediction, console: Console | None = None) -> None:
    table = Table(title=f"Q: {prediction.question}")
    table.add_column("#", justify="right", style="dim")
    table.add_column("answer")
    table.add_column("score", justify="right")
    for rank, (answer, score) in enumerate(prediction.answers, start=1):
        table.add_row(str(rank), answer, f"{score:.3f}")
    (console or Console()).print(table)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    apply_extras(cfg)
    predictor = Predictor.from_checkpoint(cfg.ckpt_path, device=cfg.device)
    prediction = predictor.predict(cfg.image, str(cfg.question), top_k=cfg.top_k)
    print_prediction(prediction)
    if cfg.get("save_attention"):
        path = save_attention_figure(cfg.image, prediction, cfg.save_attention)
        Console().print(f"attention maps: {path}")


set_project_root()

if __name__ == "__main__":
    main()
