"""A split as map-style torch datasets: one sample dict per question (image decoded lazily, once
per distinct image of a batch, or its row in a feature store), and each distinct image once for
the feature extractor."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from vqa.data.errors import DataError, OnBadRecord
from vqa.data.images import load_rgb, split_deterministic

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]


def row_image(row: dict[str, Any]) -> Image.Image:
    """The decoded RGB image of a table row: a file (``image_path``) or undecoded hub bytes."""
    if "image_path" in row:
        return load_rgb(row["image_path"], row["question_id"])
    stored = row["image"]  # undecoded hub image: {"bytes", "path"}
    return load_rgb(stored["bytes"] or stored["path"], row["question_id"], name=stored.get("path"))


class VQADataset(torch.utils.data.Dataset):
    """Rows of a split table beside their cached encoding (token ids, sparse soft targets).

    The encoding is kept as a separate table rather than joined to the rows so that a hub
    table's image column is never rewritten. With ``on_bad_record="skip"`` an image that
    cannot be decoded yields ``None`` (dropped by the collator) and a warning naming the file:
    corrupt images only show up when decoded, which the table loader does not do.

    With ``feature_rows`` (``data.features=cached``) a sample carries its image's row in the
    feature store instead of pixels, and nothing is decoded; row -1 marks an image that was
    unreadable at extraction, skipped like an unreadable file.
    """

    def __init__(
        self,
        table: Dataset,
        encoded: Dataset,
        transform: Transform | None,
        annotated: bool,
        on_bad_record: OnBadRecord = "error",
        feature_rows: np.ndarray | None = None,
    ) -> None:
        if len(table) != len(encoded):
            raise ValueError(f"table has {len(table)} rows but its encoding {len(encoded)}")
        if (transform is None) == (feature_rows is None):
            raise ValueError("give exactly one of transform (images) or feature_rows (cached)")
        if feature_rows is not None and len(feature_rows) != len(table):
            raise ValueError(f"table has {len(table)} rows but {len(feature_rows)} feature rows")
        self.table, self.encoded, self.transform = table, encoded, transform
        self.annotated, self.on_bad_record = annotated, on_bad_record
        self.feature_rows = feature_rows
        self._head, self._tail = (
            (None, None) if transform is None else split_deterministic(transform)
        )

    def __len__(self) -> int:
        return len(self.table)

    def _pixels(self, row: dict[str, Any], shared: dict[int, Any] | None) -> torch.Tensor:
        """The transformed image of ``row``; with ``shared`` (per batch, by image id), the decode
        and the deterministic head of the transform are done once per image."""
        if shared is None:
            return self.transform(row_image(row))
        image_id = row["image_id"]
        if image_id not in shared:
            try:
                image = row_image(row)
                shared[image_id] = image if self._head is None else self._head(image)
            except DataError as err:
                shared[image_id] = err
        head = shared[image_id]
        if isinstance(head, DataError):
            raise head
        return head if self._tail is None else self._tail(head)

    def _visual(
        self, index: int, row: dict[str, Any], shared: dict[int, Any] | None = None
    ) -> dict[str, Any] | None:
        if self.feature_rows is not None:
            feature_row = int(self.feature_rows[index])
            if feature_row < 0:
                log.warning(
                    "skipping question_id=%s: its image was unreadable at feature extraction",
                    row["question_id"],
                )
                return None
            return {"feature_row": feature_row}
        try:
            return {"image": self._pixels(row, shared)}
        except DataError as err:
            if self.on_bad_record == "error":
                raise
            log.warning("skipping a sample whose image cannot be read: %s", err)
            return None

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self._sample(index, self.table[index], self.encoded[index], None)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any] | None]:
        """``[self[i] for i in indices]``, with each distinct image decoded once.

        torch's DataLoader fetches a batch through this method when a dataset has one. The
        collator keeps one image per image id and batch, and an image-grouped sampler puts an
        image's questions side by side, so decoding per question would redo the same work for
        each of them. A random tail of the transform (augmentation) still runs per question, in
        the same order, so it draws the same random numbers and the batch stays the same.
        """
        indices = [int(i) for i in indices]
        rows, encoded = _rows(self.table[indices]), _rows(self.encoded[indices])
        shared: dict[int, Any] = {}
        return [
            self._sample(index, row, enc, shared)
            for index, row, enc in zip(indices, rows, encoded, strict=True)
        ]

    def _sample(
        self,
        index: int,
        row: dict[str, Any],
        encoded: dict[str, Any],
        shared: dict[int, Any] | None,
    ) -> dict[str, Any] | None:
        visual = self._visual(index, row, shared)
        if visual is None:
            return None
        sample = {
            **visual,
            "input_ids": encoded["input_ids"],
            "question_id": row["question_id"],
            "image_id": row["image_id"],
            "question": row["question"],
            "question_type": row["question_type"],
            "answer_type": row["answer_type"],
            # .get: tables built before the column existed (or by hand) have no families
            "question_family": row.get("question_family"),
        }
        if self.annotated:
            sample["answers"] = row["answers"]
            sample["target_index"] = encoded["target_index"]
            sample["target_score"] = encoded["target_score"]
        return sample


def _rows(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A batch read from a table (a list per column) as one dict per row."""
    return [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]


class DistinctImages(torch.utils.data.Dataset):
    """Each distinct image of a split once, the feature extractor's input.

    Item ``i`` is ``(i, pixels)`` for the image shown by table row ``rows[i]``, or ``(i, None)``
    when that image cannot be decoded and bad records are skipped.
    """

    def __init__(
        self,
        table: Dataset,
        rows: np.ndarray,
        transform: Transform,
        on_bad_record: OnBadRecord = "error",
    ) -> None:
        self.table, self.rows, self.transform = table, rows, transform
        self.on_bad_record = on_bad_record

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            return index, self.transform(row_image(self.table[int(self.rows[index])]))
        except DataError as err:
            if self.on_bad_record == "error":
                raise
            log.warning("image left out of the feature store, it cannot be read: %s", err)
            return index, None
