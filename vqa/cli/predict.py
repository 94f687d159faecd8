"""Answer a question about an image with a trained checkpoint, and draw what it attended to.

    python -m vqa.cli.predict ckpt_path=CKPT image=PATH question="what color is the circle?" \
        [top_k=5] [save_attention=out.png] [device=cuda]

A model of several visual streams (trained with ``data.streams``) takes one image per stream,
as a list in the checkpoint's stream order, and a model trained with conditioning fields
(``data.conditioning_fields``) takes the question's labels, one override per field::

    python -m vqa.cli.predict ckpt_path=CKPT image=[left.jpg,right.jpg] \
        question="is the circle in the left image the same color as the square in the right one?"
    python -m vqa.cli.predict ckpt_path=CKPT image=scene.jpg question="how many shapes are there?" \
        conditioning.quadrant="top left"

A command-line front for :class:`vqa.inference.Predictor` (the package API) and
:func:`vqa.plots.plot_attention`: the image and question go through the checkpoint's own
preprocessing (image size, tokenizer, question length), so an answer here is the answer
evaluation would score. An empty or too long question, an unreadable image, a wrong number of
images, a label of a field the model does not know or an unusable checkpoint is reported as one
line (``error: ...``) with exit status 2. A label the model never saw in training is answered
with its learned unknown embedding, and a warning.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vqa.checkpoint import CheckpointError
from vqa.inference import InputError, Prediction, Predictor
from vqa.plots import save_attention_figure
from vqa.utils import apply_extras, set_project_root
from vqa.utils.project import CONFIG_DIR

# The config node that takes `conditioning.<field>=<value>` overrides (configs/predict.yaml lists
# it in its defaults as `optional open_node: predict_conditioning`). Hydra composes in struct
# mode, where a plain override can only set keys the config already has, and the fields are the
# checkpoint's, unknown in advance: this node is open, so `conditioning.quadrant="top left"`
# needs no `+`. Optional: a composition that did not register it (no import of this module)
# still works, with `+conditioning.<field>=...`.
CONDITIONING_GROUP, CONDITIONING_NODE = "open_node", "predict_conditioning"


def register_conditioning_node() -> None:
    """Idempotent: store the open ``conditioning`` node the predict config starts from."""
    node = OmegaConf.create({})
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(
        group=CONDITIONING_GROUP,
        name=CONDITIONING_NODE,
        package="_global_",
        node={"conditioning": node},
    )


def print_prediction(prediction: Prediction, console: Console | None = None) -> None:
    labels = "".join(
        f" [{field}: {value}]" for field, value in (prediction.conditioning or {}).items()
    )
    table = Table(title=escape(f"Q: {prediction.question}{labels}"))  # text, not rich markup
    table.add_column("#", justify="right", style="dim")
    table.add_column("answer")
    table.add_column("score", justify="right")
    for rank, (answer, score) in enumerate(prediction.answers, start=1):
        table.add_row(str(rank), answer, f"{score:.3f}")
    (console or Console()).print(table)


def image_argument(image: Any) -> str | list[str] | dict[str, str]:
    """``image=`` as the predictor takes it: one path, a list of paths (``image=[a.jpg,b.jpg]``,
    one per visual stream in the checkpoint's order) or paths by stream name
    (``image={left: a.jpg, right: b.jpg}``)."""
    if image is None:
        return ""
    if isinstance(image, ListConfig | list | tuple):
        return [str(path) for path in image]
    if isinstance(image, DictConfig | Mapping):
        return {str(stream): str(path) for stream, path in image.items()}
    return str(image)


def conditioning_argument(conditioning: Any) -> dict[str, str | None] | None:
    """``conditioning.<field>=<value>`` overrides as the predictor takes them: labels are text
    (Hydra reads ``conditioning.size=3`` as a number), null is no label."""
    if not conditioning:
        return None
    return {
        str(field): None if value is None else str(value) for field, value in conditioning.items()
    }


# Exit status for a question, image or checkpoint that cannot be used (argparse's for bad usage).
EXIT_BAD_INPUT = 2


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Print the answers; a question, image or checkpoint that cannot be used is one line on
    stderr (``error: ...``) and exit status 2, not a traceback."""
    apply_extras(cfg)
    image = image_argument(cfg.image)
    try:
        predictor = Predictor.from_checkpoint(cfg.ckpt_path, device=cfg.device, cache_size=0)
        question = "" if cfg.question is None else str(cfg.question)
        prediction = predictor.predict(
            image,
            question,
            top_k=cfg.top_k,
            conditioning=conditioning_argument(cfg.get("conditioning")),
        )
    except (InputError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print_prediction(prediction)
    if cfg.get("save_attention"):
        path = save_attention_figure(image, prediction, cfg.save_attention)
        Console().print(f"attention maps: {path}")


set_project_root()
register_conditioning_node()

if __name__ == "__main__":
    main()
