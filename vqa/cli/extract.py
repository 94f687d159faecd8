"""Feature cache: encode every image of the chosen splits once with the frozen visual encoder.

    python -m vqa.cli.extract model/visual=resnet101_imagenet data=vqav2 data.root=DIR
    python train.py model/visual=resnet101_imagenet model.visual.freeze=all \\
        data=vqav2 data.root=DIR data.features=cached

The training config (``configs/extract_features.yaml`` includes it) is composed with the same
overrides, so the stores land where training reads them: ``data.feature_dir/<split>``. Stop it
at any time; running it again resumes at the first unfinished chunk.
"""

from __future__ import annotations

import logging

import hydra
import pytorch_lightning as pl
import torch
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
    build_manifest,
    extract_split,
    split_images,
)
from vqa.utils import apply_extras, set_project_root
from vqa.utils.project import CONFIG_DIR

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_encoder(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The visual encoder as ``vqa.cli.train`` builds it: seeded alike and, with the data set up
    first, the first module drawn from the generator, so even random weights are the same. The
    manifest's weight digests make training refuse a store made by any other encoder."""
    encoder = instantiate(cfg.model.visual)
    return encoder.to(device).eval().requires_grad_(False)


def extract(cfg: DictConfig) -> list[ExtractionReport]:
    """Write (or finish) the store of every requested split; returns what each run did."""
    with open_dict(cfg):
        cfg.data.features = "images"  # extraction reads images, whatever training will read
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule: VQADataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    options = cfg.extract
    encoder = build_encoder(cfg, resolve_device(options.device))
    encoder_config = OmegaConf.to_container(cfg.model.visual, resolve=True)
    splits = options.splits or [
        s for s in (datamodule.train_split, datamodule.val_split, datamodule.test_split) if s
    ]
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
                table, images.rows, datamodule.eval_transform, datamodule.on_bad_record
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
    print_reports(reports)
    return reports


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


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="extract_features")
def main(cfg: DictConfig) -> None:
    apply_extras(cfg)
    extract(cfg)


set_project_root()
register_schemas()

if __name__ == "__main__":
    main()
