"""Batch assembly: pad questions to the longest in the batch, densify the soft targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.rnn import pad_sequence

from vqa.data.errors import DataError

if TYPE_CHECKING:
    from vqa.data.features import FeatureStore


@dataclass(frozen=True)
class VQACollator:
    """Turns sample dicts from :class:`~vqa.data.dataset.VQADataset` into the batch dict.

    ``images`` [U,3,H,W] float, one per distinct image of the batch, and ``image_index`` [B]
    long, the row of each question's image: VQA has several questions per image, so an
    image-grouped batch runs the visual encoder once per image instead of once per question.
    ``input_ids``/``attention_mask`` [B,N] long (right padding),
    ``question_id``/``image_id`` [B] long, ``question``/``question_type``/``answer_type``
    lists; for annotated splits also ``answers`` (ten raw strings each) and ``targets``
    [B, num_answers] float soft scores.

    With a ``features`` store (samples carry ``feature_row``), ``visual_features`` replaces
    ``images``: one [U,C_s,H_s,W_s] tensor per stage, in the store's dtype (float16 halves the
    host-to-device copy; the datamodule casts after the transfer).
    """

    pad_token_id: int
    num_answers: int
    features: FeatureStore | None = None

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [s for s in samples if s is not None]  # None: skipped unreadable image (logged)
        if not kept:
            raise DataError(
                f"all {len(samples)} samples of this batch have unreadable images",
                reason="corrupt_image",
            )
        ids = [torch.tensor(s["input_ids"], dtype=torch.long) for s in kept]
        lengths = torch.tensor([len(t) for t in ids])
        input_ids = pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id)
        visual_key = "image" if self.features is None else "feature_row"
        rows: dict[int, int] = {}  # image_id -> row in `images` / `visual_features`
        visuals, image_index = [], []
        for s in kept:
            if s["image_id"] not in rows:
                rows[s["image_id"]] = len(visuals)
                visuals.append(s[visual_key])
            image_index.append(rows[s["image_id"]])
        batch: dict[str, Any] = (
            {"images": torch.stack(visuals)}
            if self.features is None
            else {"visual_features": self.features.read(visuals)}
        )
        batch |= {
            "image_index": torch.tensor(image_index, dtype=torch.long),
            "input_ids": input_ids,
            "attention_mask": (torch.arange(input_ids.shape[1]) < lengths[:, None]).long(),
            "question_id": torch.tensor([s["question_id"] for s in kept], dtype=torch.long),
            "image_id": torch.tensor([s["image_id"] for s in kept], dtype=torch.long),
            "question": [s["question"] for s in kept],
            "question_type": [s["question_type"] for s in kept],
            "answer_type": [s["answer_type"] for s in kept],
        }
        if "answers" in kept[0]:
            batch["answers"] = [s["answers"] for s in kept]
            counts = torch.tensor([len(s["target_index"]) for s in kept])
            target_rows = torch.repeat_interleave(torch.arange(len(kept)), counts)
            cols = torch.tensor([i for s in kept for i in s["target_index"]], dtype=torch.long)
            scores = torch.tensor([v for s in kept for v in s["target_score"]], dtype=torch.float32)
            targets = torch.zeros(len(kept), self.num_answers, dtype=torch.float32)
            targets[target_rows, cols] = scores
            batch["targets"] = targets
        return batch
