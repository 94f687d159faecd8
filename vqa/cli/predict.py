"""Answer a question about an image with a trained checkpoint, and draw what it attended to.

    python -m vqa.cli.predict ckpt_path=CKPT image=PATH question="what color is the circle?" \
        [top_k=5] [save_attention=out.png] [device=cuda]

A command-line front for :class:`vqa.inference.Predictor` (the package API) and
:func:`vqa.plots.plot_attention`: the image and question go through the checkpoint's own
preprocessing (image size, tokenizer, question length), so an answer here is the answer
evaluation would score. An empty or too long question, an unreadable image or an unusable
checkpoint is reported as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from vqa.checkpoint import CheckpointError
from vqa.inference import InputError, Prediction, Predictor
from vqa.plots import save_attention_figure
from vqa.utils import apply_extras, set_project_root
from vqa.utils.project import CONFIG_DIR


def print_prediction(prediction: Prediction, console: Console | None = None) -> None:
    table = Table(title=f"Q: {prediction.question}")
    table.add_column("#", justify="right", style="dim")
    table.add_column("answer")
    table.add_column("score", justify="right")
    for rank, (answer, score) in enumerate(prediction.answers, start=1):
        table.add_row(str(rank), answer, f"{score:.3f}")
    (console or Console()).print(table)


# Exit status for a question, image or checkpoint that cannot be used (argparse's for bad usage).
EXIT_BAD_INPUT = 2


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Print the answers; a question, image or checkpoint that cannot be used is one line on
    stderr (``error: ...``) and exit status 2, not a traceback."""
    apply_extras(cfg)
    try:
        predictor = Predictor.from_checkpoint(cfg.ckpt_path, device=cfg.device, cache_size=0)
        question = "" if cfg.question is None else str(cfg.question)
        image = "" if cfg.image is None else str(cfg.image)
        prediction = predictor.predict(image, question, top_k=cfg.top_k)
    except (InputError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print_prediction(prediction)
    if cfg.get("save_attention"):
        path = save_attention_figure(cfg.image, prediction, cfg.save_attention)
        Console().print(f"attention maps: {path}")


set_project_root()

if __name__ == "__main__":
    main()
