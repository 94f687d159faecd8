"""Image-grouped shuffling: the questions of one image travel together.

VQA has several questions per image (about 5.4 on VQA v2, 6 on the synthetic set). When they
share a batch, the collator keeps each image once and the model runs its visual encoder once
per image, which is where the compute of an end-to-end model goes.

Both samplers are a function of (seed, epoch) and can start part-way into an epoch
(``start``: the number of this epoch's indices already trained on), which is how
:class:`vqa.data.loader.ResumableDataLoader` resumes a run mid-epoch on exactly the batches
it had not seen.

Questions with several images (``data.streams``) are grouped by their tuple of image ids: the
questions about one pair of images travel together.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler, Sampler

ImageKey = int | Sequence[int]  # one image id, or a question's image ids (one per stream)


def _group_key(image_id: ImageKey) -> int | tuple[int, ...]:
    if isinstance(image_id, Sequence):
        return tuple(int(i) for i in image_id)
    return int(image_id)


def _image_groups(image_ids: Sequence[ImageKey]) -> list[list[int]]:
    """Question indices per image (or tuple of images), in order of first appearance."""
    groups: dict[int | tuple[int, ...], list[int]] = defaultdict(list)
    for index, image_id in enumerate(image_ids):
        groups[_group_key(image_id)].append(index)
    return list(groups.values())


def _shuffled(groups: list[list[int]], seed: int, epoch: int) -> list[list[int]]:
    """Groups in a random order, each group's questions in a random order; a function of
    ``seed`` and ``epoch`` only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(groups), generator=generator).tolist()
    return [
        [groups[g][i] for i in torch.randperm(len(groups[g]), generator=generator).tolist()]
        for g in order
    ]


def max_images_per_batch(image_ids: Sequence[int], batch_size: int, grouped: bool = True) -> int:
    """The most distinct images ``batch_size`` consecutive questions can ask about, over every
    order the samplers here can produce (any seed, epoch, rank or resume point).

    Batches are consecutive runs of the sampler's order (the loader cuts it every
    ``batch_size`` questions, and a resume starts on such a cut). With ``grouped`` an image's
    questions are contiguous, so a run touching k images holds k - 2 of them whole, between a
    partial first and last: at most 2 + (the most of the smallest images whose questions fit
    in ``batch_size - 2``). A DDP rank's padding repeats whole images of its own, which keeps
    the bound. Without grouping any question may follow any other.
    """
    sizes = sorted(Counter(int(i) for i in image_ids).values())
    if not grouped or batch_size <= 2:
        return min(batch_size, len(sizes))
    room, whole = batch_size - 2, 0
    for size in sizes[:-2]:  # the first and the last image are partial, and distinct
        if size > room:
            break
        room -= size
        whole += 1
    return min(2 + whole, len(sizes))


class ImageGroupedSampler(Sampler[int]):
    """Question indices in a random image order, each image's questions contiguous.

    The order depends only on ``seed`` and the epoch (Lightning calls ``set_epoch``), so a
    resumed run sees exactly the data order it would have seen.
    """

    def __init__(self, image_ids: Sequence[ImageKey], seed: int = 0) -> None:
        self.groups = _image_groups(image_ids)
        self.num_samples = len(image_ids)
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order = (i for group in _shuffled(self.groups, self.seed, self.epoch) for i in group)
        return itertools.islice(order, self.start, None)


class DistributedImageGroupedSampler(DistributedSampler):
    """One DDP rank's share of whole images: each image's questions all go to one rank.

    Lightning keeps a ``DistributedSampler`` as it is instead of wrapping the loader's sampler
    in one that deals indices out round-robin, which would split every image's questions over
    the ranks and have each of them encode the image. The image order (shuffled per seed and
    epoch for training, table order for evaluation) is cut into contiguous runs of about equal
    question counts, one per rank. Ranks must run the same number of batches, so each pads its
    run to a common length by repeating its own questions, as ``DistributedSampler`` pads;
    ``VQAAccuracy`` counts each question id once, so evaluation stays exact.
    """

    def __init__(
        self,
        image_ids: Sequence[ImageKey],
        num_replicas: int,
        rank: int,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            range(len(image_ids)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
        self.groups = _image_groups(image_ids)
        largest = max((len(g) for g in self.groups), default=1)
        # A run starts inside its rank's 1/R of the questions and overshoots it by less than
        # one image, so this bounds every rank's run.
        self.num_samples = math.ceil(len(image_ids) / num_replicas) + largest - 1
        self.total_size = self.num_samples * num_replicas
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._rank_order(), self.start, None)

    def _rank_order(self) -> Iterator[int]:
        order = _shuffled(self.groups, self.seed, self.epoch) if self.shuffle else self.groups
        total = sum(len(g) for g in order)
        mine, start = [], 0
        for group in order:
            if start * self.num_replicas // total == self.rank:
                mine.extend(group)
            start += len(group)
        # A rank left without images (fewer images than ranks) pads from everyone's.
        filler = itertools.cycle(mine or [i for group in order for i in group])
        yield from mine
        yield from itertools.islice(filler, self.num_samples - len(mine))
