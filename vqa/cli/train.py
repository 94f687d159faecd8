"""Training entry point: `python train.py [overrides]`, `vqa-train`, or `make train ARGS=...`.

Composes data, model, module, callbacks, loggers and trainer from `configs/train.yaml`, fits,
tests the best checkpoint and returns the optimised metric so Hydra sweepers can use it.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, Timer
from pytorch_lightning.loggers import Logger, WandbLogger

from vqa.callbacks import Preempted
from vqa.cli.extract import extract_missing
from vqa.config_schema import register_schemas
from vqa.data.tokenizer import tokenizer_spec
from vqa.models.compilation import compile_network
from vqa.models.vqa_model import data_model_args
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
    """Data first: the answer vocabulary and the tokenizer (the text encoder's, see
    :func:`~vqa.data.tokenizer.tokenizer_spec`) size the model, and the visual streams and
    conditioning fields shape it (:func:`~vqa.models.vqa_model.data_model_args`). Then the
    datamodule gets the visual encoder's description, against which it checks cached features
    before any fit."""
    datamodule = instantiate(cfg.data)
    if cfg.data.get("features") == "cached" and hasattr(datamodule, "require_shared_streams"):
        # Refused before anything is loaded: one store of frozen maps cannot serve an encoder
        # per stream.
        datamodule.require_shared_streams(cfg.model.get("visual_streams", "shared"))
    datamodule.use_tokenizer(tokenizer_spec(cfg.model.get("text")))
    datamodule.prepare_data()
    datamodule.setup("fit")
    streams = getattr(datamodule, "stream_names", None)
    conditioning_vocab = getattr(datamodule, "conditioning_vocab", None)
    net = instantiate(
        cfg.model,
        num_answers=len(datamodule.answer_vocab),
        vocab_size=len(datamodule.tokenizer),
        **data_model_args(streams, conditioning_vocab),
    )
    datamodule.use_visual_encoder(net.visual.describe())
    compile_network(net, cfg.get("compile"), cfg.data.get("static_shapes"))
    module = instantiate(cfg.module)(
        net=net,
        answer_vocab=list(datamodule.answer_vocab.answers),
        question_types=list(datamodule.question_types),
        question_families=list(datamodule.question_families),
        run_config=OmegaConf.to_container(cfg, resolve=True),
        data_artifacts=datamodule.artifacts(),
        # What eval, predict and export rebuild the net and map labels with (vqa.checkpoint).
        streams=None if streams is None else list(streams),
        conditioning_vocab=(
            None
            if conditioning_vocab is None
            else {field: list(values) for field, values in conditioning_vocab.items()}
        ),
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
    questions only, and are for `predict` (EvalAI submissions), not for `test`; the synthetic
    set's test2015 is annotated, a held-out split to score."""
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
            "`python -m vqa.cli.eval ckpt_path=... split=test-dev2015` for an EvalAI submission file, "
            "or set data.test_split=val2014).",
            getattr(datamodule, "test_split", None),
        )
        return {}
    if cfg.get("train"):
        ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        if ckpt is None:
            log.warning(
                "No best checkpoint (%s): testing the final weights of the fit.",
                no_best_checkpoint_cause(trainer),
            )
    else:
        ckpt = cfg.get("ckpt_path")
    trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def no_best_checkpoint_cause(trainer: pl.Trainer) -> str:
    """Why ModelCheckpoint kept no best checkpoint, for the message that the test uses the
    final weights instead."""
    cb = trainer.checkpoint_callback
    if cb is None:
        return "checkpointing is off"
    if no_validation_reason(trainer) is not None:
        return "no validation ran"
    if isinstance(cb, ModelCheckpoint) and cb.save_top_k == 0:
        return "ModelCheckpoint(save_top_k=0) keeps none"
    if isinstance(cb, ModelCheckpoint) and cb.monitor is not None:
        return f"ModelCheckpoint never received {cb.monitor!r}"
    return "ModelCheckpoint saved none"


def build_feature_stores(cfg: DictConfig) -> None:
    """With ``data.features=cached``, write the feature stores this run reads and lacks (none
    yet, or interrupted) with ``python -m vqa.cli.extract``'s code; complete stores are left to
    the datamodule, which refuses one made with other settings.

    Here rather than in the datamodule's ``prepare_data``: extraction needs the encoder itself,
    which only this side builds, and ``build_components`` opens the stores (``setup``) before
    the model exists. Ranks and sweep jobs that start together take turns on a lock, so one of
    them writes; under Lightning's own DDP launcher the other ranks start only at ``fit``.
    """
    data = cfg.data
    if data.get("features") != "cached" or not data.get("feature_dir"):
        return  # no feature_dir: the datamodule says what is missing
    if cfg.model.get("visual_streams") == "separate":
        return  # no store serves an encoder per stream: the datamodule refuses the run
    # setup("fit") opens train and val whatever `train` says; the test stage opens the test split.
    splits = [data.get("train_split"), data.get("val_split")]
    if cfg.get("test"):
        splits.append(data.get("test_split"))
    extract_missing(cfg, [s for s in splits if s])


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit and test; returns every metric the trainer logged and the objects it built."""
    # Before seeding: extraction seeds and draws its encoder as a separate extract run would.
    build_feature_stores(cfg)
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


def validation_ran(trainer: pl.Trainer) -> bool:
    """Whether this process ran a validation loop in `fit`, sanity checks excepted.

    Lightning's own test for the same question (ModelCheckpoint's "monitored key missing" is an
    error only when it is true); a resumed fit counts only what it validated since.
    """
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    return bool(getattr(val_loop, "_has_run", False))


def first_validation_step(trainer: pl.Trainer) -> int | None:
    """The optimizer step after which the fit would have validated first; None where that is
    no batch count (time-based `val_check_interval`, a train loader without length)."""
    batches, check = trainer.num_training_batches, trainer.val_check_batch
    if not isinstance(check, int) or not math.isfinite(batches) or batches < 1:
        return None
    every_n_epochs = trainer.check_val_every_n_epoch
    # check_val_every_n_epoch=None counts val_check_batch across epochs (Lightning's
    # total_batch_idx), otherwise within the epochs that validate.
    due = check if every_n_epochs is None else (every_n_epochs - 1) * batches + check
    epochs, in_epoch = divmod(due - 1, int(batches))
    # Lightning also steps the optimizer on an epoch's last batch, whatever the accumulation.
    accumulate = trainer.accumulate_grad_batches
    return epochs * math.ceil(batches / accumulate) + math.ceil((in_epoch + 1) / accumulate)


def no_validation_reason(trainer: pl.Trainer) -> str | None:
    """Why `fit` ended without validating (which stop condition came first); None when it
    validated."""
    if validation_ran(trainer):
        return None
    if trainer.limit_val_batches == 0:
        return "validation is off (limit_val_batches=0)"
    if not trainer.enable_validation:
        return "validation is off (no validation data or validation_step)"
    if trainer.num_training_batches == 0:
        return "there were no training batches"
    step, first = trainer.global_step, first_validation_step(trainer)
    before = "before the first validation" + ("" if first is None else f" at step {first}")
    if trainer.interrupted:
        return f"the fit was interrupted at step {step}, {before}"
    if trainer.max_steps != -1 and step >= trainer.max_steps:
        return f"the run stopped at max_steps={trainer.max_steps} {before}"
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    remaining = None if timer is None else timer.time_remaining()
    if remaining is not None and remaining <= 0:
        limit = timedelta(seconds=round(timer.time_elapsed() + remaining))
        return f"the run stopped at max_time={limit} after {step} steps, {before}"
    if trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs:
        return f"the run ended at max_epochs={trainer.max_epochs} ({step} steps) {before}"
    if trainer.should_stop:
        return f"trainer.should_stop was set (by a callback?) at step {step}, {before}"
    return f"the fit ended at step {step}, {before}"


def kept_weights(cfg: DictConfig, trainer: pl.Trainer, metrics: dict[str, float]) -> str:
    """Which weights a run without validation kept and tested: there is no best checkpoint,
    only the final weights (and last.ckpt, where ModelCheckpoint wrote one)."""
    last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
    saved = f"saved as {last}" if last and Path(last).is_file() else "saved in no checkpoint"
    if any(k.startswith("test/") for k in metrics):
        return f"No best checkpoint without it: the test scored the final weights ({saved})."
    why = "test=false" if not cfg.get("test") else "the test split has no answers"
    return f"No best checkpoint without it: the final weights are {saved} (not tested: {why})."


def under_sweeper(hydra_cfg: DictConfig | None = None) -> bool:
    """Whether a sweeper consumes main's return value (a multirun, or a sweeper such as
    `hparams_search=optuna` configured): it then needs a number from every trial.

    ``hydra_cfg`` defaults to the running job's HydraConfig; none set means no sweeper.
    """
    if hydra_cfg is None:
        if not HydraConfig.initialized():
            return False
        hydra_cfg = HydraConfig.get()
    mode = hydra_cfg.get("mode")
    if getattr(mode, "name", mode) == RunMode.MULTIRUN.name:  # the enum, or its name
        return True
    sweeper = OmegaConf.select(hydra_cfg, "sweeper._target_", default=None) or ""
    return bool(sweeper) and not sweeper.endswith(".BasicSweeper")


class MissingMetricError(KeyError):
    """`optimized_metric` is not among the logged metrics."""

    def __str__(self) -> str:  # KeyError's own quotes the message as a repr
        return str(self.args[0])


def missing_metric_message(name: str, metrics: dict[str, float], no_validation: str | None) -> str:
    if no_validation is not None:
        return (
            f"optimized_metric={name!r} was not logged: no validation ran ({no_validation}). "
            "Let every trial validate at least once (more trainer.max_steps / max_time, or a "
            "smaller trainer.val_check_interval)."
        )
    return (
        f"optimized_metric={name!r} was never logged although validation ran; logged metrics: "
        f"{sorted(metrics)}. Fix `optimized_metric` in the config or the hparams_search preset."
    )


def metric_value(
    metrics: dict[str, float],
    name: str | None,
    *,
    required: bool = True,
    no_validation: str | None = None,
) -> float | None:
    """The value of ``name`` in ``metrics``; None for no name.

    A missing metric raises MissingMetricError saying why (``no_validation``: no validation
    ran, and why; else the name is wrong) when ``required`` (a sweeper needs a number from
    every trial), and is None otherwise.
    """
    if not name:
        return None
    if name in metrics:
        return metrics[name]
    if required:
        raise MissingMetricError(missing_metric_message(name, metrics, no_validation))
    return None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train and return ``optimized_metric``. Only a sweeper needs that number: a single run
    without it (e.g. stopped before its first validation) logs why and returns None."""
    apply_extras(cfg)
    try:
        metrics, objects = train(cfg)
    except Preempted as stop:
        # As a process killed by the signal would: schedulers see an unfinished job.
        log.warning("Stopped by %s; last.ckpt holds the run (%s).", stop, stop.checkpoint)
        raise SystemExit(128 + stop.signum) from None
    name = cfg.get("optimized_metric")
    missing = bool(name) and name not in metrics
    sweeping = under_sweeper()
    trainer = objects["trainer"]
    no_validation = no_validation_reason(trainer) if cfg.get("train") else "train=false"
    if cfg.get("train") and no_validation is not None:
        line = f"No validation ran: {no_validation}. {kept_weights(cfg, trainer, metrics)}"
        if missing and not sweeping:
            line += f" optimized_metric={name!r} was not logged: returning None."
        log.warning(line)
    elif missing and not sweeping:
        log.warning("%s Returning None.", missing_metric_message(name, metrics, no_validation))
    return metric_value(metrics, name, required=sweeping, no_validation=no_validation)


set_project_root()
register_schemas()

if __name__ == "__main__":
    main()
