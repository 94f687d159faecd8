"""The training entry point end to end on the tiny synthetic composition."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from tests.helpers import CONFIG_DIR, TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config
from vqa.cli.train import build_components, metric_value, no_validation_reason, train
from vqa.data.artifacts import artifacts_from_dict
from vqa.data.shapes import FAMILIES

FUSIONS = sorted(p.stem for p in (CONFIG_DIR / "fusion").glob("*.yaml"))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fast_dev_run_every_fusion(cfg_train: DictConfig, fusion: str) -> None:
    cfg = compose_config(
        "train",
        [
            *TINY_OVERRIDES,
            *TINY_DATA_OVERRIDES,
            f"fusion={fusion}",
            "fusion.hidden_dim=32",
            "trainer.fast_dev_run=true",
        ],
        Path(cfg_train.paths.output_dir).parent,
        Path(cfg_train.paths.data_dir),
    )
    with open_dict(cfg):
        cfg.test = False
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert 0.0 <= metrics["val/acc"] <= 1.0
    # the same seed rebuilds the initial weights: one optimizer step must have moved them
    torch.manual_seed(cfg.seed)
    _, fresh = build_components(cfg)
    trained = objects["module"].net
    for name, p in fresh.net.named_parameters():
        # weight matrices only: e.g. an attention key bias is softmax-invariant (zero gradient)
        if name.startswith(("fusion.", "head.")) and p.ndim >= 2:
            assert not torch.equal(p, trained.get_parameter(name)), f"{name} did not train"


def test_fit_checkpoint_and_test(cfg_train: DictConfig) -> None:
    with open_dict(cfg_train):
        cfg_train.trainer.max_epochs = 2
    metrics, objects = train(cfg_train)

    assert {"val/acc", "val/acc_best", "test/acc", "train/loss_epoch"} <= set(metrics)
    assert metrics["val/acc_best"] >= metrics["val/acc"] - 1e-6
    assert metric_value(metrics, "val/acc_best") == metrics["val/acc_best"]
    assert no_validation_reason(objects["trainer"]) is None
    # a sweeper's objective must exist; validation ran, so a missing one is a wrong name
    with pytest.raises(KeyError, match="optimized_metric='val/nope' was never logged although"):
        metric_value(metrics, "val/nope", required=True)
    assert metric_value(metrics, "val/nope", required=False) is None

    out = Path(cfg_train.paths.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert (out / "csv" / "metrics.csv").is_file()
    # accuracy per question family, for val (each epoch) and the held-out test2015, in the CSV
    datamodule = objects["datamodule"]
    assert datamodule.test_split == "test2015" and datamodule.tables["test2015"].annotated
    with (out / "csv" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for stage, split in (("val", "val2014"), ("test", "test2015")):
        asked = set(datamodule.tables[split].table["question_family"])
        assert asked and asked <= set(datamodule.question_families)
        logged = {k for k in rows[0] if k.startswith(f"{stage}/family/")}
        assert logged == {f"{stage}/family/{family}" for family in asked}, stage
        values = [float(r[k]) for r in rows for k in logged if r[k]]
        assert values and all(0.0 <= v <= 1.0 for v in values)
    assert sum(bool(r["val/family/exists"]) for r in rows) == 2  # once per epoch
    # nothing in a checkpoint can run code: it loads with weights_only=True and carries what
    # evaluation needs (resolved config, answer vocabulary, tokenizer)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["question_families"] == sorted(f.name for f in FAMILIES)
    assert hparams["run_config"]["fusion"]["_target_"].endswith("ParallelCoAttention")
    vocab, tokenizer = artifacts_from_dict(hparams["data_artifacts"])
    assert list(vocab.answers) == hparams["answer_vocab"]
    assert tokenizer("is there a red circle?")["input_ids"][0] == tokenizer.cls_token_id
    head_out = [
        v.shape[0]
        for k, v in ckpt["state_dict"].items()
        if k.startswith("net.head.") and k.endswith("weight")
    ]
    assert head_out[-1] == len(vocab)


def test_train_on_official_layout_with_tricky_images(tmp_path: Path) -> None:
    """`python train.py data=vqav2 data.root=DIR` on a fixture in the official layout whose
    images include grayscale, CMYK and PNG-bytes-in-.jpg files, as real COCO does."""
    from PIL import Image

    from vqa.data.shapes import ShapesConfig, generate

    root = tmp_path / "vqa"
    generate(
        root,
        ShapesConfig(
            num_train_images=8,
            num_val_images=4,
            num_test_images=2,
            questions_per_image=4,
            image_size=32,
            seed=3,
        ),
    )
    images = sorted((root / "Images" / "mscoco" / "train2014").glob("*.jpg"))
    Image.open(images[0]).convert("L").save(images[0], format="JPEG")
    Image.open(images[1]).convert("CMYK").save(images[1], format="JPEG")
    Image.open(images[2]).save(images[2], format="PNG")  # PNG content behind a .jpg name

    cfg = compose_config(
        "train",
        [
            *TINY_OVERRIDES,
            "data=vqav2",
            f"data.root={root}",
            "data.image_size=32",
            "data.min_answer_count=1",
            "data.num_workers=0",
            "data.batch_size=8",
            "data.pin_memory=false",
            "data.persistent_workers=false",
        ],
        tmp_path,
        tmp_path / "data",
    )
    metrics, objects = train(cfg)
    datamodule = objects["datamodule"]
    assert datamodule.bad_records == {s: {} for s in datamodule.bad_records}
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert Path(cfg.paths.output_dir, "answer_vocab.json").is_file()
