"""What surrounds a run: where its files go, which callbacks need a logger, which warnings show."""

from __future__ import annotations

import warnings
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config, train_cli
from vqa.cli.train import train
from vqa.utils import apply_extras, drop_logger_only_callbacks


def test_train_without_logger(tmp_path: Path, shared_data_dir: Path) -> None:
    """`logger=none` is an ordinary choice: the LR monitor steps aside instead of crashing."""
    cfg = compose_config(
        "train", [*TINY_OVERRIDES, *TINY_DATA_OVERRIDES, "logger=none"], tmp_path, shared_data_dir
    )
    assert "lr_monitor" in cfg.callbacks  # the shipped callbacks, not a narrowed set
    try:
        metrics, objects = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    trainer = objects["trainer"]
    assert trainer.loggers == []
    assert not any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks)
    assert any(isinstance(cb, ModelCheckpoint) for cb in trainer.callbacks)
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_logger_only_callbacks_stay_with_a_logger() -> None:
    from pytorch_lightning.loggers import CSVLogger

    callbacks = [LearningRateMonitor(), ModelCheckpoint()]
    assert drop_logger_only_callbacks(callbacks, [CSVLogger("unused")]) == callbacks
    assert drop_logger_only_callbacks(callbacks, []) == callbacks[1:]


def _emitted(message: str, module: str) -> bool:
    """Whether a UserWarning attributed to ``module`` reaches the user after `apply_extras`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_extras(OmegaConf.create({"extras": {"ignore_warnings": True}}))
        warnings.warn_explicit(message, UserWarning, f"{module}.py", 1, module=module)
    return any(message in str(w.message) for w in caught)


def test_correctness_warnings_are_never_filtered() -> None:
    """A mid-epoch resume that replays the wrong batches must say so, whatever extras say."""
    assert _emitted(
        "You're resuming from a checkpoint that ended before the epoch ended and your dataloader"
        " is not resumable. This can cause unreliable results if further training is done.",
        "pytorch_lightning.loops.training_epoch_loop",
    )
    assert _emitted("Some weights of BertModel were not initialized", "transformers.modeling")
    # the named third-party noise is what the filter is for
    assert not _emitted(
        "The 'train_dataloader' does not have many workers which may be a bottleneck.",
        "pytorch_lightning.trainer.connectors.data_connector",
    )


def test_output_dir_override_moves_hydra_folder() -> None:
    """`hydra.run.dir` follows `paths.output_dir` when it is set, and the default otherwise."""
    from vqa.utils.project import compose_run_config

    try:
        chosen = compose_run_config("train", ["paths.output_dir=/somewhere/run"])
        assert chosen.hydra.run.dir == "/somewhere/run"
        default = compose_run_config("train", ["paths.log_dir=/logs"])
        assert default.hydra.run.dir.startswith("/logs/quickstart/runs/")  # the default preset
    finally:
        GlobalHydra.instance().clear()


def test_one_override_puts_every_file_of_a_run_in_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "my_run"
    result = train_cli(tmp_path, f"paths.output_dir={out}", "test=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / ".hydra" / "config.yaml").is_file()
    assert (out / "train.log").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    assert not (tmp_path / "logs").exists(), "part of the run went to the default log folder"


def test_multirun_refuses_one_output_dir_for_all_jobs(tmp_path: Path) -> None:
    result = train_cli(
        tmp_path, "seed=1,2", f"paths.output_dir={tmp_path / 'shared'}", multirun=True
    )
    assert result.returncode != 0
    assert "hydra.sweep.dir" in result.stderr
