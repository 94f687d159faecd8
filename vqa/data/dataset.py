"""A split as a map-style torch dataset: one sample dict per question, image decoded lazily."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from PIL import Image

from vqa.data.errors import DataError, OnBadRecord
from vqa.data.images import load_rgb

log = logging.getLogger(__name__)


class VQADataset(torch.utils.data.Dataset):
    """Rows of a split table beside their cached encoding (token ids, sparse soft targets).

    The encoding is kept as a separate table rather than joined to the rows so that a hub
    table's image column is never rewritten. With ``on_bad_record="skip"`` an image that
    cannot be decoded yields ``None`` (dropped by the collator) and a warning naming the file:
    corrupt images only show up when decoded, which the table loader does not do.
    """

    def __init__(
        self,
        table: Dataset,
        encoded: Dataset,
        transform: Callable[[Image.Image], torch.Tensor],
        annotated: bool,
        on_bad_record: OnBadRecord = "error",
    ) -> None:
        if len(table) != len(encoded):
            raise ValueError(f"table has {len(table)} rows but its encoding {len(encoded)}")
        self.table, self.encoded, self.transform = table, encoded, transform
        self.annotated, self.on_bad_record = annotated, on_bad_record

    def __len__(self) -> int:
        return len(self.table)

    def _image(self, row: dict[str, Any]) -> Image.Image:
        if "image_path" in row:
            return load_rgb(row["image_path"], row["question_id"])
        stored = row["image"]  # undecoded hub image: {"bytes", "path"}
        return load_rgb(
            stored["bytes"] or stored["path"], row["question_id"], name=stored.get("path")
        )

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.table[index]
        try:
            image = self.transform(self._image(row))
        except DataError as err:
            if self.on_bad_record == "error":
                raise
            log.warning("skipping a sample whose image cannot be read: %s", err)
            return None
        encoded = self.encoded[index]
        sample = {
            "image": image,
            "input_ids": encoded["input_ids"],
            "question_id": row["question_id"],
            "image_id": row["image_id"],
            "question": row["question"],
            "question_type": row["question_type"],
            "answer_type": row["answer_type"],
        }
        if self.annotated:
            sample["answers"] = row["answers"]
            sample["target_index"] = encoded["target_index"]
            sample["target_score"] = encoded["target_score"]
        return sample
