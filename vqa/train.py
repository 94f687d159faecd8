"""Training entry point: `python train.py [overrides]`, `vqa-train`, or `make train ARGS=...`.

Composes data, model, module, callbacks, loggers and trainer from `configs/train.yaml`, fits,
tests the best checkpoint and returns the optimised metric so Hydra sweepers can use it.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vqa.config_schema import register_schemas
from vqa.utils import (
    apply_extras,
    instantiate_callbacks,
    instantiate_loggers,
    set_project_root,
)
from vqa.utils.project import CONFIG_DIR

log = logging.getLogger(__name__)


def build_components(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Data first: the answer vocabulary and the tokenizer size the model."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    net = instantiate(
        cfg.model,
        num_answers=len(datamodule.answer_vocab),
        vocab_size=len(datamodule.tokenizer),
    )
    module = instantiate(cfg.module)(
        net=net,
        answer_vocab=list(datamodule.answer_vocab.answers),
        question_types=list(datamodule.question_types),
        run_config=OmegaConf.to_container(cfg, resolve=True),
        data_artifacts=datamodule.artifacts(),
    )
    return datamodule, module


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit and test; returns every metric the trainer logged and the objects it built."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule, module = build_components(cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if trainer.is_global_zero:
        datamodule.save_artifacts(cfg.paths.output_dir)

    try:
        if cfg.get("train"):
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
            )
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            if best is None:
                log.warning("No best checkpoint (checkpointing off?): testing the current weights.")
            trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    finally:
        # Loggers with background processes (wandb) must be closed even when training crashes.
        for lg in loggers:
            lg.finalize("success")
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()
    return metrics, {"datamodule": datamodule, "module": module, "trainer": trainer}


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    if not name:
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}. "
            "Fix `optimized_metric` in the config or the hparams_search preset."
        )
    return metrics[name]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    apply_extras(cfg)
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


set_project_root()
register_schemas()

if __name__ == "__main__":
    main()
