"""Image-grouped shuffling: the questions of one image travel together.

VQA has several questions per image (about 5.4 on VQA v2, 6 on the synthetic set). When they
share a batch, the collator keeps each image once and the model runs its visual encoder once
per image, which is where the compute of an end-to-end model goes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ImageGroupedSampler(Sampler[int]):
    """Question indices in a random image order, each image's questions contiguous.

    The order depends only on ``seed`` and the epoch (Lightning calls ``set_epoch``), so a
    resumed run sees exactly the data order it would have seen.
    """

    def __init__(self, image_ids: Sequence[int], seed: int = 0) -> None:
        groups: dict[int, list[int]] = defaultdict(list)
        for index, image_id in enumerate(image_ids):
            groups[int(image_id)].append(index)
        self.groups = list(groups.values())
        self.num_samples = len(image_ids)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for g in torch.randperm(len(self.groups), generator=generator).tolist():
            group = self.groups[g]
            for i in torch.randperm(len(group), generator=generator).tolist():
                yield group[i]
