"""Distributed training: the image-grouped sampler under DDP, prepare_data under concurrent
processes, a 2-process CPU DDP run that scores validation exactly like one process with the
same weights, and the SLURM launcher composing with the config tree."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from omegaconf import open_dict
from torch.utils.data import DistributedSampler

from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config
from vqa.cli.train import train
from vqa.data.batch import VQABatch
from vqa.data.datamodule import VQADataModule
from vqa.data.samplers import DistributedImageGroupedSampler
from vqa.data.shapes import is_current
from vqa.data.sources import ShapesSource
from vqa.data.table import column

# ------------------------------------------------------------------------------------ sampler

# 9 images with 1 to 5 questions each, interleaved as a real table is not.
IMAGE_IDS = [i % 9 for i in range(27)] + [3, 3, 7]


def rank_orders(world: int, shuffle: bool, seed: int = 0, epoch: int = 0) -> list[list[int]]:
    orders = []
    for rank in range(world):
        sampler = DistributedImageGroupedSampler(
            IMAGE_IDS, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed
        )
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert len(orders[-1]) == len(sampler)
    return orders


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_get_whole_images_and_together_every_question(world: int, shuffle: bool) -> None:
    orders = rank_orders(world, shuffle)
    assert len({len(o) for o in orders}) == 1  # equal lengths: no rank waits in a collective
    images = [{IMAGE_IDS[i] for i in order} for order in orders]
    for a in range(world):
        for b in range(a + 1, world):
            assert not images[a] & images[b], "an image was split across ranks"
    assert sorted({i for order in orders for i in order}) == list(range(len(IMAGE_IDS)))
    # nothing but padding repeats, and padding is only of the rank's own questions
    for order in orders:
        unique = list(dict.fromkeys(order))
        assert order[: len(unique)] == unique
    assert len(orders[0]) * world - len(IMAGE_IDS) < world * 5  # less than an image per rank


def test_distributed_order_is_a_function_of_seed_and_epoch() -> None:
    assert rank_orders(2, True, seed=1) == rank_orders(2, True, seed=1)
    assert rank_orders(2, True, seed=1) != rank_orders(2, True, seed=2)
    assert rank_orders(2, True, seed=1, epoch=1) != rank_orders(2, True, seed=1, epoch=0)
    # evaluation keeps table order: rank 0 takes the first images, in order
    assert rank_orders(2, False)[0][:6] == [0, 9, 18, 1, 10, 19]
    # Lightning leaves a DistributedSampler alone instead of dealing indices round-robin
    assert isinstance(DistributedImageGroupedSampler(IMAGE_IDS, 2, 0), DistributedSampler)


# ------------------------------------------------------------------------------ prepare_data

SOURCE = ShapesSource(
    num_train_images=40, num_val_images=4, num_test_images=2, questions_per_image=2, image_size=32
)


def prepare_in_child(root: Path, log: Path, barrier: Any) -> None:
    """One 'rank': count generations, then prepare and set up at the same moment as the others."""
    import vqa.data.shapes as shapes

    generate = shapes.generate

    def counted(*args: Any, **kwargs: Any) -> Any:
        with log.open("a") as f:
            f.write(f"{os.getpid()}\n")
        return generate(*args, **kwargs)

    shapes.generate = counted
    datamodule = VQADataModule(
        source=SOURCE, root=root, cache_dir=root.parent / "cache", min_answer_count=1
    )
    barrier.wait()
    datamodule.prepare_data()
    datamodule.setup("fit")


def test_concurrent_prepare_data_generates_once(tmp_path: Path) -> None:
    """SLURM starts every rank's script at once and nodes share the data folder: one process
    generates the synthetic set, the others wait for it instead of racing."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    root, log = tmp_path / "shapes", tmp_path / "generated.log"
    workers = [
        context.Process(target=prepare_in_child, args=(root, log, barrier)) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert len(log.read_text().split()) == 1
    assert is_current(root, SOURCE)


# ------------------------------------------------------------------------------------ DDP fit


class EvalRecorder(pl.Callback):
    """Writes, per rank, the images it trained and validated on and, from rank 0, the synced
    per-question validation accuracies: forked ranks return nothing else to the test."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.images: dict[str, set[int]] = {"train": set(), "val": set()}

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: VQABatch,
        batch_idx: int,
    ) -> None:
        self.images["train"].update(batch.image_id.tolist())

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: VQABatch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self.images["val"].update(batch.image_id.tolist())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        per_question = pl_module.val_acc.per_question()  # a collective: every rank calls it
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            (self.out_dir / "per_question.json").write_text(json.dumps(per_question))
        seen = {stage: sorted(ids) for stage, ids in self.images.items()}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_two_process_ddp_validates_like_one_process(tmp_path: Path, shared_data_dir: Path) -> None:
    cfg = compose_config(
        "train",
        [
            *TINY_OVERRIDES,
            *TINY_DATA_OVERRIDES,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            # 64 px: a rank's padded last batch may hold a single image, and BatchNorm in
            # training needs more than one value per channel (layer4 is 1x1 at 32 px)
            "data.image_size=64",
            "data.eval_batch_size=4",  # several validation batches per rank, a padded last one
            # the progress bar stays on: it reads logged values on rank 0 only, which must
            # not trigger a collective the other ranks never join
            "callbacks.lr_monitor=null",
            "logger=none",
            "test=false",
        ],
        tmp_path,
        shared_data_dir,
    )
    with open_dict(cfg):
        cfg.callbacks.recorder = {
            "_target_": "tests.test_ddp.EvalRecorder",
            "out_dir": str(tmp_path / "ddp"),
        }
    metrics, objects = train(cfg)

    datamodule, module = objects["datamodule"], objects["module"]
    single = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[EvalRecorder(str(tmp_path / "single"))],
    )
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    (single_metrics,) = single.validate(
        module, datamodule=datamodule, ckpt_path=last, weights_only=True
    )

    ddp_scores = read_json(tmp_path / "ddp" / "per_question.json")
    single_scores = read_json(tmp_path / "single" / "per_question.json")
    val_table = datamodule.tables[datamodule.val_split].table
    # every validation question scored exactly once across the ranks, each as one process does
    assert sorted(map(int, ddp_scores)) == sorted(column(val_table, "question_id"))
    assert ddp_scores == single_scores
    assert len(set(single_scores.values())) > 1  # a dropped or repeated question would show
    assert metrics["val/acc"] == pytest.approx(single_metrics["val/acc"], abs=1e-7)

    ranks = [read_json(tmp_path / "ddp" / f"rank{r}.json") for r in range(2)]
    for stage, table in (("train", datamodule.train_split), ("val", datamodule.val_split)):
        # whole images per rank: each is encoded on one rank only, and all are covered
        assert not set(ranks[0][stage]) & set(ranks[1][stage]), stage
        assert set(ranks[0][stage]) | set(ranks[1][stage]) == set(
            column(datamodule.tables[table].table, "image_id")
        )


def test_slurm_launcher_composes_with_the_config_tree(tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        [
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.nodes=2",
            "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.gpus_per_node=4",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
        ],
        tmp_path,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # one task per GPU, as Lightning's SLURM environment expects
    assert launcher.tasks_per_node == cfg.trainer.devices == launcher.gpus_per_node
    assert launcher.nodes == cfg.trainer.num_nodes
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.sync_batchnorm
