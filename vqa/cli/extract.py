"""Feature cache: encode every image of the chosen splits once with the frozen visual encoder.

    python -m vqa.cli.extract experiment=vqav2_resnet101_bert model.visual.freeze=all data.root=DIR
    python train.py experiment=vqav2_resnet101_bert model.visual.freeze=all \\
        data.root=DIR data.features=cached

The training config (``configs/extract_features.yaml`` includes it) is composed with the same
overrides, its default experiment (the quick-start) included, so the stores land where training
reads them: ``data.feature_dir/<split>``. Stop it at any time; running it again resumes at the
first unfinished chunk.

Training (and evaluation) with ``data.features=cached`` run this same code themselves for the
splits whose store is missing or unfinished (:func:`build_missing_stores`), so running it first
is optional: it is for extracting ahead of time, on another machine, or with other
``extract.*`` settings.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table
from torch import nn

from vqa.config_schema import register_schemas
from vqa.data.datamodule import VQADataModule
from vqa.data.dataset import DistinctImages
from vqa.data.features import (
    ExtractionReport,
    FeatureWriter,
    StageEncoder,
    build_manifest,
    extract_split,
    require_frozen,
    require_shared_visual_streams,
    split_images,
    store_complete,
)
from vqa.utils import apply_extras, set_project_root
from vqa.utils.project import CONFIG_DIR

log = logging.getLogger(__name__)
CONFIG_NAME = "extract_features"
LOCK_FILE = ".extract.lock"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_encoder(cfg: DictConfig, device: torch.device, *, frozen_only: bool = False) -> nn.Module:
    """The visual encoder as ``vqa.cli.train`` builds it: seeded alike and, with the data set up
    first, the first module drawn from the generator, so even random weights are the same. The
    manifest's weight digests make training refuse a store made by any other encoder.

    ``frozen_only`` refuses an encoder that the config would train, before any image is
    encoded: training refuses stores for it anyway."""
    encoder = instantiate(cfg.model.visual)
    if frozen_only:
        require_frozen(encoder.describe())
    return ready_encoder(encoder, device)


def ready_encoder(encoder: nn.Module, device: torch.device) -> nn.Module:
    return encoder.to(device).eval().requires_grad_(False)


def default_options(**overrides: Any) -> DictConfig:
    """The ``extract`` node of ``configs/extract_features.yaml`` with ``overrides`` on top, for
    callers whose config was not composed from it (its ``num_workers`` interpolates
    ``data.num_workers``: resolved once the node sits in a run config, else override it)."""
    defaults = OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml").extract
    return OmegaConf.merge(defaults, overrides)


def extraction_lock(feature_dir: str | Path) -> FileLock:
    """Held while stores under ``feature_dir`` are written. Ranks started together (torchrun,
    SLURM) and sweep jobs side by side would otherwise write one store at once; the first to
    hold it writes, the others then find the stores complete."""
    Path(feature_dir).mkdir(parents=True, exist_ok=True)
    return FileLock(Path(feature_dir) / LOCK_FILE)


def missing_stores(feature_dir: str | Path, splits: Sequence[str]) -> list[str]:
    """The splits without a complete store under ``feature_dir`` (none yet, or interrupted)."""
    return [s for s in dict.fromkeys(splits) if not store_complete(Path(feature_dir) / s)]


def write_stores(
    datamodule: VQADataModule,
    encoder: StageEncoder,
    encoder_config: dict[str, Any],
    splits: Sequence[str],
    options: DictConfig,
) -> list[ExtractionReport]:
    """Write (or finish) the store of each split with ``encoder`` (ready: eval mode, frozen, on
    its device), reading the images through ``datamodule`` (prepared): every distinct image of
    every stream it reads (``data.streams``), once. The caller holds :func:`extraction_lock`."""
    reports = []
    for split in dict.fromkeys(splits):
        table = datamodule.table(split).table
        images = split_images(table)
        manifest = build_manifest(
            encoder,
            encoder_config,
            split,
            images,
            datamodule.image_size,
            options.dtype,
            options.batch_size,
        )
        writer = FeatureWriter(
            datamodule.feature_dir / split, manifest, images.image_ids, options.overwrite
        )
        try:
            dataset = DistinctImages(
                table,
                images.rows,
                datamodule.eval_transform,
                datamodule.on_bad_record,
                streams=images.streams,
            )
            reports.append(
                extract_split(
                    encoder,
                    dataset,
                    writer,
                    num_workers=options.num_workers,
                    progress=options.progress,
                )
            )
        finally:
            writer.close()
    return reports


def _extract(
    cfg: DictConfig, splits: Sequence[str] | None = None, *, frozen_only: bool = False
) -> list[ExtractionReport]:
    # Before anything is encoded: training refuses stores for one encoder per stream anyway.
    require_shared_visual_streams(cfg.model.get("visual_streams", "shared"))
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.data.features = "images"  # extraction reads images, whatever training will read
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule: VQADataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    options = cfg.extract
    encoder = build_encoder(cfg, resolve_device(options.device), frozen_only=frozen_only)
    encoder_config = OmegaConf.to_container(cfg.model.visual, resolve=True)
    splits = (
        splits
        or options.splits
        or [s for s in (datamodule.train_split, datamodule.val_split, datamodule.test_split) if s]
    )
    return write_stores(datamodule, encoder, encoder_config, splits, options)


def extract(cfg: DictConfig, splits: Sequence[str] | None = None) -> list[ExtractionReport]:
    """Write (or finish) the store of every requested split (``splits``, else
    ``extract.splits``, else the data config's train, val and test splits); returns what each
    run did. ``cfg`` is an ``extract_features`` config, or any run config with an ``extract``
    node (:func:`default_options`); it is not modified."""
    with extraction_lock(cfg.data.feature_dir):
        return _extract(cfg, splits)


def build_missing_stores(
    feature_dir: str | Path,
    splits: Sequence[str],
    write: Callable[[list[str]], list[ExtractionReport]],
) -> list[ExtractionReport]:
    """Write the stores of ``splits`` that are missing or unfinished under ``feature_dir`` with
    ``write(splits)``, logging that and how long it took; nothing when all are complete.

    A complete store is never rewritten, whatever made it: one made with other settings is for
    the reader to refuse, with its own message.
    """
    if not missing_stores(feature_dir, splits):
        return []  # read-only: no lock file, so a complete store may sit on a read-only mount
    with extraction_lock(feature_dir):
        missing = missing_stores(feature_dir, splits)  # another process may have written them
        if not missing:
            return []
        log.info(
            "data.features=cached: no complete feature store for %s under %s; extracting "
            "(as `python -m vqa.cli.extract` with the same overrides would) ...",
            ", ".join(missing),
            feature_dir,
        )
        start = time.perf_counter()
        reports = write(missing)
        log.info(
            "Feature stores of %s written in %.1f s (%d images encoded)",
            ", ".join(missing),
            time.perf_counter() - start,
            sum(r.computed for r in reports),
        )
    return reports


def extract_missing(cfg: DictConfig, splits: Sequence[str]) -> list[ExtractionReport]:
    """The training side of the cache: build the stores of ``splits`` that ``cfg`` (a training
    config with ``data.features=cached``) would read and that are missing or unfinished, with
    the code and defaults of ``python -m vqa.cli.extract`` (no progress bar unless the config
    has ``extract.progress=true``; any ``extract.*`` in it wins)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.extract = OmegaConf.merge(default_options(progress=False), cfg.get("extract") or {})
    return build_missing_stores(
        cfg.data.feature_dir,
        splits,
        lambda missing: _extract(cfg, missing, frozen_only=True),
    )


def print_reports(reports: list[ExtractionReport]) -> None:
    table = Table(title="feature stores")
    for heading in ("split", "images", "computed now", "unreadable", "img/s", "KiB/image", "GiB"):
        table.add_column(heading, justify="left" if heading == "split" else "right")
    for r in reports:
        table.add_row(
            r.split,
            str(r.num_images),
            str(r.computed),
            str(r.unreadable),
            f"{r.images_per_second:.1f}" if r.computed else "-",
            f"{r.bytes_per_image / 1024:.1f}",
            f"{r.bytes_per_image * r.num_images / 2**30:.3f}",
        )
    Console().print(table)
    for r in reports:
        log.info("%s: %s", r.split, r.directory)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> None:
    apply_extras(cfg)
    print_reports(extract(cfg))


set_project_root()
register_schemas()

if __name__ == "__main__":
    main()
