"""Feature cache: extraction, resume, refusal of mismatched stores, and cached training that
equals image training with a frozen backbone."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from PIL import Image

import vqa.data.features as features_module
from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config
from vqa.cli.eval import evaluate_checkpoint
from vqa.cli.extract import extract
from vqa.cli.train import train
from vqa.data.datamodule import VQADataModule
from vqa.data.errors import DataError
from vqa.data.features import (
    FEATURES,
    MANIFEST,
    STATUS,
    FeatureStore,
    FeatureStoreError,
    build_manifest,
    encode_rows,
    read_manifest,
    split_images,
)

# Frozen encoder (what caching requires), one fast epoch, nothing written that is not checked.
BASE = [
    *TINY_OVERRIDES,
    *TINY_DATA_OVERRIDES,
    "model.visual.freeze=all",
    "callbacks.model_checkpoint=null",
    "trainer.enable_checkpointing=false",
    "callbacks.lr_monitor=null",
    "logger=none",
    "test=false",
]
STORE_FILES = (MANIFEST, "image_ids.npy", FEATURES, STATUS)
FP16_UNIT_ROUNDOFF = 2.0**-11  # round-to-nearest relative error of a normal float16
FP16_SUBNORMAL_HALF_STEP = 2.0**-25


def extract_config(tmp_path: Path, data_dir: Path, *overrides: str) -> DictConfig:
    return compose_config(
        "extract_features", [*BASE, "extract.progress=false", *overrides], tmp_path, data_dir
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> dict[str, Path]:
    """The tiny set extracted once per dtype, batched differently from training (chunks of 3
    images where training batches 2), as a real store would be."""
    root = tmp_path_factory.mktemp("stores")
    made = {}
    for dtype in ("float32", "float16"):
        made[dtype] = root / dtype
        extract(
            extract_config(
                root,
                shared_data_dir,
                f"extract.dtype={dtype}",
                "extract.batch_size=3",
                f"data.feature_dir={made[dtype]}",
            )
        )
    return made


def cached_datamodule(cfg: DictConfig) -> VQADataModule:
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_cached_training_equals_image_training(
    tmp_path: Path, shared_data_dir: Path, stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    images_metrics, images_run = train(compose_config("train", BASE, tmp_path, shared_data_dir))

    def no_decoding(row: dict[str, Any]) -> Image.Image:
        raise AssertionError(f"cached training decoded the image of {row['question_id']}")

    monkeypatch.setattr("vqa.data.dataset.row_image", no_decoding)
    cached_cfg = compose_config(
        "train",
        [*BASE, "data.features=cached", f"data.feature_dir={stores['float32']}"],
        tmp_path,
        shared_data_dir,
    )
    cached_metrics, cached_run = train(cached_cfg)

    batch = next(iter(cached_run["datamodule"].train_dataloader()))
    assert batch.images is None and [f.shape[1] for f in batch.visual_features] == [256, 512]
    # float32 maps: the same numbers as the encoder computes in the loop, up to kernel rounding
    # between batch sizes (none at all on one thread)
    for key in ("train/loss_epoch", "val/loss", "val/acc", "train/acc"):
        assert cached_metrics[key] == pytest.approx(images_metrics[key], rel=1e-6), key
    trained = images_run["module"].net.state_dict()
    for name, value in cached_run["module"].net.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-6, msg=name)


def test_float16_store_is_the_float32_store_rounded(stores: dict[str, Path]) -> None:
    for split in ("train2014", "val2014"):
        exact, half = (
            FeatureStore(stores["float32"] / split),
            FeatureStore(stores["float16"] / split),
        )
        assert half.manifest.dtype == "float16" and exact.manifest.dtype == "float32"
        assert [(s.name, s.shape) for s in half.manifest.stages] == [
            ("layer3", (256, 2, 2)),
            ("layer4", (512, 1, 1)),
        ]
        assert np.array_equal(exact.image_ids, half.image_ids)
        reference = exact.array.astype(np.float64)
        error = np.abs(half.array.astype(np.float64) - reference)
        assert np.all(error <= FP16_UNIT_ROUNDOFF * np.abs(reference) + FP16_SUBNORMAL_HALF_STEP)
        assert error.max() > 0  # float16 really rounded something: the check above has teeth
        # DataLoader workers and ddp_spawn ranks get the store pickled: without the array
        clone = pickle.loads(pickle.dumps(half))
        assert len(pickle.dumps(half)) < half.array.nbytes
        for got, want in zip(clone.read([1, 0]), half.read([1, 0]), strict=True):
            assert torch.equal(got, want)
        # the whole row (both stages) per image: 2 bytes per value
        assert (stores["float16"] / split / FEATURES).stat().st_size - half.array.offset == (
            len(half.image_ids) * (256 * 4 + 512) * 2
        )


def test_interrupted_extraction_resumes_to_a_byte_identical_store(
    tmp_path: Path, shared_data_dir: Path, stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = extract_config(
        tmp_path,
        shared_data_dir,
        "extract.splits=[train2014]",
        "extract.batch_size=3",
        "extract.dtype=float16",
        f"data.feature_dir={tmp_path / 'store'}",
    )
    calls: list[int] = []  # images per encoder call
    interrupt_at: list[int] = [2]

    def counted(*args: Any) -> np.ndarray:
        calls.append(len(args[1]))
        if len(calls) in interrupt_at:
            raise KeyboardInterrupt
        return encode_rows(*args)

    monkeypatch.setattr(features_module, "encode_rows", counted)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg)
    store = tmp_path / "store" / "train2014"
    assert np.load(store / STATUS).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # the first chunk only
    with pytest.raises(FeatureStoreError, match=r"incomplete: 5 of 8 images.*resume"):
        FeatureStore(store)

    calls.clear()
    interrupt_at.clear()
    (report,) = extract(cfg)
    assert calls == [3, 2] and report.computed == 5  # the done chunk was not recomputed
    reference = stores["float16"] / "train2014"
    for name in STORE_FILES:
        assert (store / name).read_bytes() == (reference / name).read_bytes(), name

    calls.clear()
    assert extract(cfg)[0].computed == 0 and calls == []  # complete: nothing to do


def test_extraction_refuses_a_store_made_with_other_settings(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    target = [f"data.feature_dir={tmp_path / 'store'}", "extract.splits=[val2014]"]
    extract(extract_config(tmp_path, shared_data_dir, *target))
    with pytest.raises(FeatureStoreError, match=r"other settings.*arch.*resnet18.*resnet34"):
        extract(extract_config(tmp_path, shared_data_dir, *target, "model/visual=resnet34"))
    with pytest.raises(FeatureStoreError, match=r"stages.*layer4"):
        extract(extract_config(tmp_path, shared_data_dir, *target, "model.visual.stages=[layer3]"))
    with pytest.raises(FeatureStoreError, match=r"image_size: stored 32, asked 40"):
        extract(extract_config(tmp_path, shared_data_dir, *target, "data.image_size=40"))
    with pytest.raises(FeatureStoreError, match=r"dtype: stored 'float16', asked 'float32'"):
        extract(extract_config(tmp_path, shared_data_dir, *target, "extract.dtype=float32"))
    (report,) = extract(
        extract_config(
            tmp_path, shared_data_dir, *target, "extract.dtype=float32", "extract.overwrite=true"
        )
    )
    assert report.computed == 4
    assert FeatureStore(tmp_path / "store" / "val2014").manifest.dtype == "float32"


def test_cached_datamodule_checks_the_model_encoder(
    tmp_path: Path, shared_data_dir: Path, stores: dict[str, Path]
) -> None:
    cfg = compose_config(
        "train",
        [*BASE, "data.features=cached", f"data.feature_dir={stores['float16']}"],
        tmp_path,
        shared_data_dir,
    )
    datamodule = cached_datamodule(cfg)

    def encoder(seed: int, **changes: Any) -> Any:
        """The description of the encoder training would build (seeded alike)."""
        pl.seed_everything(seed)
        return instantiate(cfg.model.visual, **changes).describe()

    with pytest.raises(FeatureStoreError, match=r"frozen visual encoder.*freeze=all"):
        datamodule.use_visual_encoder(encoder(cfg.seed, freeze="none"))
    with pytest.raises(FeatureStoreError, match=r"weights differ"):
        datamodule.use_visual_encoder(encoder(cfg.seed + 1))
    with pytest.raises(FeatureStoreError, match=r"holds only \['layer3', 'layer4'\]"):
        datamodule.use_visual_encoder(encoder(cfg.seed, stages=["layer2"]))
    with pytest.raises(FeatureStoreError, match=r"layer4.*512.*made by.*resnet18"):
        datamodule.use_visual_encoder(encoder(cfg.seed, arch="resnet50"))  # 2048 channels
    # A model reading a subset of the stored stages gets just those, float16 on the wire and
    # floats after the transfer.
    datamodule.use_visual_encoder(encoder(cfg.seed, stages=["layer4"]))
    batch = next(iter(datamodule.val_dataloader()))
    (layer4,) = batch.visual_features
    assert layer4.shape == (batch.image_index.max() + 1, 512, 1, 1)
    assert layer4.dtype == torch.float16
    cast = datamodule.on_after_batch_transfer(batch, 0)
    assert cast.visual_features[0].dtype == torch.float32 and layer4.dtype == torch.float16
    assert cast.input_ids is batch.input_ids and cast.answers is batch.answers  # that field only
    stored = FeatureStore(stores["float16"] / "val2014")
    rows = stored.rows_for(batch.image_id.numpy())
    first = {int(i): r for i, r in zip(batch.image_index.tolist(), rows.tolist(), strict=True)}
    np.testing.assert_array_equal(
        layer4.flatten(1).numpy(), stored.array[[first[i] for i in sorted(first)], 256 * 4 :]
    )

    with open_dict(cfg):
        cfg.data.image_size = 40
    with pytest.raises(FeatureStoreError, match=r"extracted at 32 px but data.image_size=40"):
        cached_datamodule(cfg)
    with open_dict(cfg):
        cfg.data.image_size = 32
        cfg.data.feature_dir = str(tmp_path / "nowhere")
    with pytest.raises(FeatureStoreError, match=r"no feature store.*vqa.cli.extract"):
        cached_datamodule(cfg)
    with pytest.raises(InstantiationException, match=r"augment=false"):
        instantiate(cfg.data, augment=True)


def test_features_are_checked_against_a_described_encoder_before_any_trainer_reads_them(
    tmp_path: Path, shared_data_dir: Path, stores: dict[str, Path]
) -> None:
    """The datamodule learns of the model only through the description an entry point hands
    it: handed over before setup (as evaluation does), stores are checked as they open; not
    handed over at all, a trainer's setup refuses the stores instead of reading them unchecked."""
    cfg = compose_config(
        "train",
        [*BASE, "data.features=cached", f"data.feature_dir={stores['float16']}"],
        tmp_path,
        shared_data_dir,
    )
    pl.seed_everything(cfg.seed + 1)
    other = instantiate(cfg.model.visual).describe()
    datamodule = instantiate(cfg.data)
    datamodule.use_visual_encoder(other)  # no store is open yet: nothing to refuse
    with pytest.raises(FeatureStoreError, match=r"weights differ"):
        datamodule.setup("fit")

    unchecked = instantiate(cfg.data)
    unchecked.trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False
    )
    with pytest.raises(FeatureStoreError, match=r"no visual encoder was described.*describe\(\)"):
        unchecked.setup("fit")


def test_unreadable_and_changed_images(tmp_path: Path) -> None:
    """An image unreadable at extraction is skipped (counted) or refused like an unreadable file,
    and a store whose images changed on disk is refused."""
    data_dir = tmp_path / "data"
    store = tmp_path / "store"
    cfg = extract_config(tmp_path, data_dir, f"data.feature_dir={store}", "data.on_bad_record=skip")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    broken = sorted((datamodule.root / "Images" / "mscoco" / "train2014").glob("*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    reports = {r.split: r for r in extract(cfg)}
    assert (reports["train2014"].unreadable, reports["val2014"].unreadable) == (1, 0)

    train_cfg = compose_config(
        "train",
        [*BASE, "data.features=cached", f"data.feature_dir={store}", "data.on_bad_record=skip"],
        tmp_path,
        data_dir,
    )
    skipping = cached_datamodule(train_cfg)
    dataset = skipping.datasets["train2014"]
    broken_id = int(broken.stem.rsplit("_", 1)[1])
    skipped = [i for i in range(len(dataset)) if dataset[i] is None]
    assert skipped and all(dataset.table[i]["image_id"] == broken_id for i in skipped)
    with open_dict(train_cfg):
        train_cfg.data.on_bad_record = "error"
    with pytest.raises(DataError, match=r"1 image\(s\) were unreadable at feature extraction"):
        cached_datamodule(train_cfg)

    with open_dict(train_cfg):
        train_cfg.data.on_bad_record = "skip"
    changed = sorted((datamodule.root / "Images" / "mscoco" / "val2014").glob("*.jpg"))[0]
    Image.new("RGB", (32, 32), "white").save(changed, quality=50)
    with pytest.raises(FeatureStoreError, match=r"images of split 'val2014' changed"):
        cached_datamodule(train_cfg)


def test_float16_overflow_is_an_error_not_inf(tmp_path: Path, shared_data_dir: Path) -> None:
    cfg = extract_config(tmp_path, shared_data_dir)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    encoder = instantiate(cfg.model.visual).eval()
    images = split_images(datamodule.table("val2014").table)
    manifest = build_manifest(encoder, {"arch": "resnet18"}, "val2014", images, 32, "float16", 4)
    with torch.no_grad():
        encoder.body["conv1"].weight.mul_(1e6)  # BatchNorm at its init statistics passes it on
    with pytest.raises(FeatureStoreError, match=r"do not fit float16.*extract.dtype=float32"):
        encode_rows(encoder, torch.randn(2, 3, 32, 32), manifest)


# ----------------------------------------------------------------------------- built on demand


def cached_train_config(tmp_path: Path, data_dir: Path, store: Path, *overrides: str) -> DictConfig:
    return compose_config(
        "train",
        [*BASE, "data.features=cached", f"data.feature_dir={store}", *overrides],
        tmp_path,
        data_dir,
    )


def store_mtimes(store: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(store.rglob("*")) if p.is_file()}


def test_training_builds_a_missing_store_once_and_evaluation_its_split(
    tmp_path: Path,
    shared_data_dir: Path,
    stores: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`python train.py ... data.features=cached` with no store runs the extractor's code first
    (the splits it reads: test=false here) and trains on what it wrote; the next run finds the
    stores complete and touches nothing. Evaluating the checkpoint on a machine without the
    stores writes the evaluated split's with the checkpoint's own encoder: the same store."""
    store = tmp_path / "store"
    with caplog.at_level(logging.INFO, logger="vqa.cli.extract"):
        _, first = train(cached_train_config(tmp_path / "a", shared_data_dir, store))
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["train2014", "val2014"]
    built = [r.getMessage() for r in caplog.records if "feature store" in r.getMessage().lower()]
    assert len(built) == 2 and "train2014, val2014" in built[0] and "written in" in built[1]
    for split in ("train2014", "val2014"):
        manifest = read_manifest(store / split)
        # what `python -m vqa.cli.extract` writes, chunking (batch_size) aside
        assert manifest.differences(read_manifest(stores["float16"] / split)) == {}
        assert first["datamodule"].feature_stores[split].directory == store / split
    batch = next(iter(first["datamodule"].train_dataloader()))
    assert batch.images is None and batch.visual_features is not None

    written = store_mtimes(store)
    caplog.clear()

    def no_decoding(row: dict[str, Any]) -> Image.Image:
        raise AssertionError(f"decoded the image of {row['question_id']}")

    monkeypatch.setattr("vqa.data.dataset.row_image", no_decoding)  # no extraction either
    with caplog.at_level(logging.INFO, logger="vqa.cli.extract"):
        train(cached_train_config(tmp_path / "b", shared_data_dir, store))
    assert store_mtimes(store) == written
    assert not [r for r in caplog.records if "feature store" in r.getMessage().lower()]
    monkeypatch.undo()

    ckpt = tmp_path / "cached.ckpt"
    first["trainer"].save_checkpoint(ckpt)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    data = {"num_workers": 0, "cache_dir": str(tmp_path / "cache")}
    elsewhere = tmp_path / "eval_store"
    built_here = evaluate_checkpoint(
        ckpt,
        trainer,
        tmp_path / "e1",
        data={**data, "feature_dir": str(elsewhere)},
        split="val2014",
    )
    assert sorted(p.name for p in elsewhere.iterdir() if p.is_dir()) == ["val2014"]
    assert read_manifest(elsewhere / "val2014").differences(read_manifest(store / "val2014")) == {}
    from_training = evaluate_checkpoint(
        ckpt, trainer, tmp_path / "e2", data={**data, "feature_dir": str(store)}, split="val2014"
    )
    assert store_mtimes(store) == written
    assert built_here.results_file.read_text() == from_training.results_file.read_text()


def test_training_never_overwrites_a_store_made_with_other_settings(
    tmp_path: Path, shared_data_dir: Path, stores: dict[str, Path]
) -> None:
    """A complete store made otherwise is refused by the datamodule as before, an unfinished one
    by the extractor; an unfinished one made alike is finished."""
    store = tmp_path / "store"
    shutil.copytree(stores["float16"], store)
    written = store_mtimes(store)
    with pytest.raises(FeatureStoreError, match=r"weights differ"):
        train(cached_train_config(tmp_path, shared_data_dir, store, "seed=43"))
    with pytest.raises(FeatureStoreError, match=r"holds only \['layer3', 'layer4'\]"):
        train(cached_train_config(tmp_path, shared_data_dir, store, "model.visual.stages=[layer2]"))
    assert store_mtimes(store) == written

    status = np.load(store / "val2014" / STATUS)
    status[-1] = 0  # as an interrupted extraction leaves it
    np.save(store / "val2014" / STATUS, status)
    with pytest.raises(FeatureStoreError, match=r"other settings.*digests.*extract.overwrite"):
        train(cached_train_config(tmp_path, shared_data_dir, store, "seed=43"))
    assert np.load(store / "val2014" / STATUS).tolist() == status.tolist()

    train(cached_train_config(tmp_path, shared_data_dir, store))
    assert (np.load(store / "val2014" / STATUS) == 1).all()


def test_training_extracts_nothing_for_an_encoder_it_would_train(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    store = tmp_path / "store"
    with pytest.raises(FeatureStoreError, match=r"frozen visual encoder.*freeze=all"):
        train(cached_train_config(tmp_path, shared_data_dir, store, "model.visual.freeze=none"))
    assert not [p for p in store.iterdir() if p.is_dir()]
