"""Typed schemas that Hydra checks at compose time, and the project's config resolvers.

Lightning does not type-check its constructor arguments (``Trainer(max_epochs="abc")`` only
fails deep inside the fit loop), so the trainer group extends this schema: a wrong override
is rejected by Hydra with a message naming the key before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


@dataclass
class TrainerSchema:
    _target_: str = "pytorch_lightning.Trainer"
    default_root_dir: str | None = None
    accelerator: str = "auto"
    strategy: Any = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    min_epochs: int | None = None
    max_epochs: int | None = None
    min_steps: int | None = None
    max_steps: int = -1
    max_time: str | None = None
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    limit_test_batches: float | None = None
    limit_predict_batches: float | None = None
    overfit_batches: float = 0.0
    val_check_interval: float | None = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    fast_dev_run: Any = False
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: Any = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    sync_batchnorm: bool = False
    detect_anomaly: bool = False
    profiler: str | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    enable_checkpointing: bool | None = None
    reload_dataloaders_every_n_epochs: int = 0
    barebones: bool = False
    plugins: Any = None


# What `paths.output_dir` holds unless the user names a folder: the run folder Hydra made.
RUN_FOLDER_DEFAULT = "${hydra:runtime.output_dir}"


def run_dir(default: str, *, _root_: DictConfig) -> str:
    """`hydra.run.dir`: `paths.output_dir` when the user set it, else ``default``.

    Hydra writes `.hydra/` and the log file into its run folder before the job starts, so one
    override (`paths.output_dir=...`) must move that folder too, or a run's files end up in two
    places. The raw value is read (not resolved): by default it points back at the run folder.
    """
    paths = _root_.get("paths")
    if not isinstance(paths, DictConfig) or "output_dir" not in paths:
        return default
    chosen = paths._get_node("output_dir")._value()
    return default if chosen in (RUN_FOLDER_DEFAULT, None) else str(paths.output_dir)


def register_schemas() -> None:
    """Idempotent: called by every entry point and by the tests before composing."""
    ConfigStore.instance().store(group="trainer", name="trainer_schema", node=TrainerSchema)
    OmegaConf.register_new_resolver("vqa.run_dir", run_dir, replace=True)


register_schemas()
