"""Image-grouped batches: each image is decoded and encoded once per batch, with identical
results."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import vqa.data.dataset as dataset_module
from vqa.data.batch import VQABatch
from vqa.data.collate import VQACollator
from vqa.data.datamodule import VQADataModule
from vqa.data.dataset import VQADataset
from vqa.data.errors import BadRecordLog, DataError
from vqa.data.images import build_transform
from vqa.data.layout import split_layout
from vqa.data.samplers import ImageGroupedSampler
from vqa.data.sources import ShapesSource


def test_sampler_keeps_questions_of_an_image_together_and_is_a_permutation() -> None:
    image_ids = [7, 7, 3, 9, 3, 7, 9, 9, 1]
    sampler = ImageGroupedSampler(image_ids, seed=5)
    order = list(sampler)
    assert sorted(order) == list(range(len(image_ids)))
    runs = [image_ids[i] for i in order]
    # each image appears as one contiguous run
    changes = [a for a, b in itertools.pairwise(runs) if a != b] + [runs[-1]]
    assert len(changes) == len(set(image_ids))


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    image_ids = list(range(50)) * 3
    a, b = ImageGroupedSampler(image_ids, seed=1), ImageGroupedSampler(image_ids, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ImageGroupedSampler(image_ids, seed=2)) != list(
        ImageGroupedSampler(image_ids, seed=1)
    )


def sample(question_id: int, image_id: int) -> dict:
    return {
        "image": torch.full((3, 4, 4), float(image_id)),
        "input_ids": [101, 5 + question_id, 102],
        "question_id": question_id,
        "image_id": image_id,
        "question": "q",
        "question_type": "what color is the",
        "answer_type": "other",
    }


def test_collator_stores_each_image_once_and_indexes_it() -> None:
    batch = VQACollator(pad_token_id=0, num_answers=3)(
        [sample(0, 4), sample(1, 2), sample(2, 4), sample(3, 9), sample(4, 2)]
    )
    assert batch.images.shape[0] == 3
    rebuilt = batch.images[batch.image_index]
    assert torch.equal(rebuilt[:, 0, 0, 0], batch.image_id.float())


# --------------------------------------------------------------- one decode per image and batch

# Five questions per image (VQA v2 has 5.4) and batches of 16, so that images straddle batches.
SOURCE = ShapesSource(
    num_train_images=12,
    num_val_images=3,
    num_test_images=1,
    questions_per_image=5,
    image_size=48,
    seed=4,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grouping") / "shapes"
    SOURCE.prepare(root)
    return root


def grouped_loader(root: Path, augment: bool = False) -> DataLoader:
    dm = VQADataModule(
        source=SOURCE,
        root=root,
        image_size=40,
        augment=augment,
        min_answer_count=1,
        batch_size=16,
        group_by_image=True,
        seed=3,
    )
    dm.setup("fit")
    return dm.train_dataloader()


class PerQuestion(torch.utils.data.Dataset):
    """The dataset as a DataLoader used it before batched fetching: one ``dataset[i]`` each."""

    def __init__(self, dataset: VQADataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.dataset[index]


def batches(loader: DataLoader, seed: int) -> list[VQABatch]:
    torch.manual_seed(seed)  # the loader draws its worker seed, augmentation its parameters
    return list(loader)


def assert_same_batches(a: list[VQABatch], b: list[VQABatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for field in dataclasses.fields(x):
            u, v = getattr(x, field.name), getattr(y, field.name)
            if isinstance(u, torch.Tensor):
                assert u.dtype == v.dtype and torch.equal(u, v), field.name
            else:
                assert u == v, field.name


@pytest.mark.parametrize("augment", [False, True])
def test_batches_are_bit_identical_to_per_question_fetches(data_root: Path, augment: bool) -> None:
    train = grouped_loader(data_root, augment)
    dataset = train.dataset
    assert callable(getattr(dataset, "__getitems__", None))  # what DataLoader fetches through

    def loader(source: torch.utils.data.Dataset) -> DataLoader:
        # Plain loaders on both sides, so that only the fetch differs.
        sampler = ImageGroupedSampler(dataset.table["image_id"], seed=3)
        return DataLoader(source, batch_size=16, sampler=sampler, collate_fn=train.collate_fn)

    fetched = batches(loader(dataset), seed=0)
    assert_same_batches(fetched, batches(loader(PerQuestion(dataset)), seed=0))
    assert sum(len(b.question_id) for b in fetched) == len(dataset)
    assert any(b.image_id.unique().numel() < len(b.image_id) for b in fetched)
    if augment:  # the random tail ran: another seed gives other pixels
        assert not torch.equal(fetched[0].images, batches(loader(dataset), seed=1)[0].images)


@pytest.mark.parametrize("augment", [False, True])
def test_each_batch_decodes_each_of_its_images_once(
    data_root: Path, augment: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []

    def counting_row_image(row: dict[str, Any]) -> Any:
        decoded.append(row["image_id"])
        return row_image(row)

    row_image = dataset_module.row_image
    monkeypatch.setattr(dataset_module, "row_image", counting_row_image)
    questions = 0
    for batch in grouped_loader(data_root, augment):
        assert sorted(decoded) == sorted(set(batch.image_id.tolist()))
        questions += len(batch.question_id)
        decoded.clear()
    assert questions == 12 * 5


def test_batched_fetch_handles_an_unreadable_image_like_single_fetches(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    SOURCE.prepare(root)
    table = SOURCE.load_split(root, "train2014", BadRecordLog()).table
    broken = table["image_id"][0]
    split_layout(root, "train2014").image_path(broken).write_bytes(b"not a jpeg")
    encoded = table.map(
        lambda _: {"input_ids": [2, 3], "target_index": [0], "target_score": [1.0]},
        remove_columns=table.column_names,
    )
    indices = list(range(10))
    skip = VQADataset(table, encoded, build_transform(40), annotated=True, on_bad_record="skip")
    fetched, single = skip.__getitems__(indices), [skip[i] for i in indices]
    # every question of the broken image, and only those
    assert [s is None for s in fetched] == [table["image_id"][i] == broken for i in indices]
    collate = VQACollator(pad_token_id=0, num_answers=1)
    assert_same_batches([collate(fetched)], [collate(single)])
    fail = VQADataset(table, encoded, build_transform(40), annotated=True)
    with pytest.raises(DataError, match=f"question_id={table['question_id'][0]}"):
        fail.__getitems__(indices)
