"""Image-grouped batches: each image is encoded once per batch, with identical results."""

from __future__ import annotations

import itertools

import torch

from vqa.data.collate import VQACollator
from vqa.data.samplers import ImageGroupedSampler


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
    assert batch["images"].shape[0] == 3
    rebuilt = batch["images"][batch["image_index"]]
    assert torch.equal(rebuilt[:, 0, 0, 0], batch["image_id"].float())
