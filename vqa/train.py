"""Training entry point: `python train.py [overrides]`, `vqa-train`, or `make train ARGS=...`.

Composes data, model, module, callbacks, loggers and trainer from `configs/train.yaml`, fits,
tests the best checkpoint and returns the optimised metric so Hydra sweepers can use it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger, WandbLogger

from vqa.config_schema import register_schemas
from vqa.utils import (
    apply_extras,
    drop_logger_only_callbacks,
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


def continue_checkpoints(ckpt_path: str, callbacks: list[pl.Callback]) -> None:
    """A resumed run keeps writing its checkpoints beside the one it resumes from.

    Hydra gives every launch a new output folder, but ModelCheckpoint restores its best-so-far
    (score, top-k files, last) only when its folder is unchanged: in a new one the resumed run
    would forget the best epoch before the interruption, and test a worse checkpoint.
    """
    if not Path(ckpt_path).is_file():  # "last", "hpc", a registry name: Lightning resolves it
        return
    run_checkpoints = os.path.realpath(Path(ckpt_path).parent)
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath != run_checkpoints:
            log.info("Resuming: checkpoints continue in %s (not %s)", run_checkpoints, cb.dirpath)
            cb.dirpath = run_checkpoints


def has_test_annotations(datamodule: pl.LightningDataModule) -> bool:
    """Whether `trainer.test` can score the test split: VQA v2 test-dev2015/test2015 have
    questions only, and are for `predict` (EvalAI submissions), not for `test`."""
    split = getattr(datamodule, "test_split", None)
    if split is None:
        return False
    datamodule.setup("test")  # loads the split once; trainer.test reuses it
    return datamodule.tables[split].annotated


def close_loggers(loggers: list[Logger], status: str) -> None:
    """Flush and close every logger, marking the run ``status`` ("success" or "failed").

    Lightning finalizes loggers after each fit/test, but not when a run fails outside them, and
    it never ends a wandb run: its background process would linger, the run stay "running".
    """
    for lg in loggers:
        lg.finalize(status)
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=0 if status == "success" else 1)


def run_test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
) -> dict[str, float]:
    """Score the best checkpoint of this fit (or `ckpt_path` when not training) on the test
    split; nothing when that split has no answers to score against."""
    if not has_test_annotations(datamodule):
        log.warning(
            "Skipping trainer.test: test split %r has no annotations to score (use "
            "`python -m vqa.eval ckpt_path=... split=test-dev2015` for an EvalAI submission file, "
            "or set data.test_split=val2014).",
            getattr(datamodule, "test_split", None),
        )
        return {}
    if cfg.get("train"):
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        if ckpt is None:
            log.warning("No best checkpoint (checkpointing off?): testing the current weights.")
    else:
        ckpt = cfg.get("ckpt_path")
    trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit and test; returns every metric the trainer logged and the objects it built."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule, module = build_components(cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    if cfg.get("train") and cfg.get("ckpt_path"):
        continue_checkpoints(cfg.ckpt_path, callbacks)
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = drop_logger_only_callbacks(callbacks, loggers)
    status = "failed"
    try:
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if trainer.is_global_zero:
            datamodule.save_artifacts(cfg.paths.output_dir)

        if cfg.get("train"):
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
            )
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test"):
            metrics |= run_test(cfg, trainer, module, datamodule)
        status = "success"
    finally:
        close_loggers(loggers, status)
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
