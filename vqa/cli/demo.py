"""An interactive page for a trained checkpoint (Gradio): upload or pick an image, ask
questions, see the top answers and the attention maps.

    python -m vqa.cli.demo ckpt_path=CKPT [port=7860] [device=cuda] [examples.count=8]
    make demo CKPT=...

The page itself is :func:`vqa.demo.build_demo`; this entry point loads the checkpoint, finds
example images and serves the page until Ctrl+C. It needs the ``demo`` extra (gradio).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from vqa.checkpoint import CheckpointError
from vqa.utils import apply_extras, set_project_root
from vqa.utils.project import CONFIG_DIR

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="demo")
def main(cfg: DictConfig) -> None:
    apply_extras(cfg)
    try:
        from vqa.demo import (
            build_demo,
            checkpoint_examples,
            find_examples,
            launch_demo,
            require_one_image,
        )
    except ImportError as err:  # gradio is an optional extra
        raise SystemExit(
            f"the demo needs gradio ({err}); install it with `pip install -e '.[demo]'` "
            "(`make install` does)"
        ) from err
    from vqa.inference import Predictor

    try:
        predictor = Predictor.from_checkpoint(cfg.ckpt_path, device=cfg.device)
        require_one_image(predictor.trained)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from err
    count = int(cfg.examples.count)
    if cfg.examples.root:
        examples = find_examples(cfg.examples.root, cfg.examples.split or "val2014", count)
    else:
        examples = checkpoint_examples(predictor.trained, count, cfg.examples.split)
    if count and not examples:
        log.info(
            "no example images found (the checkpoint's data is not on this machine?): set "
            "examples.root=DIR to a VQA v2 layout folder; uploads work regardless"
        )
    demo = build_demo(predictor, examples, top_k=int(cfg.top_k))
    log.info("serving the demo of %s (Ctrl+C stops it)", cfg.ckpt_path)
    launch_demo(
        demo,
        host=str(cfg.host),
        port=cfg.port,
        share=bool(cfg.share),
        examples=examples,
    )


set_project_root()

if __name__ == "__main__":
    main()
