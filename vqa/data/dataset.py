"""A split as map-style torch datasets: one sample dict per question (image decoded lazily, once
per distinct image of a batch, or its row in a feature store; one per stream where questions
have several images), and each distinct image once for the feature extractor."""

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


def stream_image(row: dict[str, Any], stream: int) -> Image.Image:
    """The decoded RGB image of stream ``stream`` (position in ``image_paths``) of a table row
    with several images per question."""
    return load_rgb(row["image_paths"][stream], row["question_id"])


class VQADataset(torch.utils.data.Dataset):
    """Rows of a split table beside their cached encoding (token ids, sparse soft targets).

    The encoding is kept as a separate table rather than joined to the rows so that a hub
    table's image column is never rewritten. With ``on_bad_record="skip"`` an image that
    cannot be decoded yields ``None`` (dropped by the collator) and a warning naming the file:
    corrupt images only show up when decoded, which the table loader does not do.

    With ``feature_rows`` (``data.features=cached``) a sample carries its image's row in the
    feature store instead of pixels, and nothing is decoded; row -1 marks an image that was
    unreadable at extraction, skipped like an unreadable file.

    A table with several images per question (``image_ids``/``image_paths`` columns, see
    :mod:`vqa.data.table`) gives samples ``image_ids`` and, per stream in order, ``images`` or
    ``feature_rows`` (then [N, K]) instead of ``image``/``feature_row``; a question with any
    unreadable image is skipped whole. A ``conditioning`` column travels as the sample's
    ``conditioning`` values (strings or None), which the collator maps to ids.
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
        self.streams = "image_ids" in table.column_names
        if feature_rows is not None and self.streams != (feature_rows.ndim == 2):
            raise ValueError("feature_rows are [N, K] for a table with streams, else [N]")
        self.conditioning = "conditioning" in table.column_names
        self.table, self.encoded, self.transform = table, encoded, transform
        self.annotated, self.on_bad_record = annotated, on_bad_record
        self.feature_rows = feature_rows
        self._head, self._tail = (
            (None, None) if transform is None else split_deterministic(transform)
        )

    def __len__(self) -> int:
        return len(self.table)

    def _pixels(
        self, image_id: int, load: Callable[[], Image.Image], shared: dict[int, Any] | None
    ) -> torch.Tensor:
        """The transformed image ``load`` decodes; with ``shared`` (per batch, by image id), the
        decode and the deterministic head of the transform are done once per image."""
        if shared is None:
            return self.transform(load())
        if image_id not in shared:
            try:
                image = load()
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
            if self.streams:
                feature_rows = [int(r) for r in self.feature_rows[index]]
                visual: dict[str, Any] = {"feature_rows": feature_rows}
            else:
                feature_rows = [int(self.feature_rows[index])]
                visual = {"feature_row": feature_rows[0]}
            if min(feature_rows) < 0:
                log.warning(
                    "skipping question_id=%s: its image was unreadable at feature extraction",
                    row["question_id"],
                )
                return None
            return visual
        try:
            if self.streams:
                return {
                    "images": [
                        # k=k: each lambda decodes its own stream
                        self._pixels(image_id, lambda k=k: stream_image(row, k), shared)
                        for k, image_id in enumerate(row["image_ids"])
                    ]
                }
            return {"image": self._pixels(row["image_id"], lambda: row_image(row), shared)}
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
        if self.streams:
            sample["image_ids"] = tuple(row["image_ids"])
        if self.conditioning:
            sample["conditioning"] = tuple(row["conditioning"])
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

    Item ``i`` is ``(i, pixels)`` for the image shown by table row ``rows[i]`` (in its stream
    ``streams[i]`` where questions have several images: :func:`~vqa.data.features.
    split_images`), or ``(i, None)`` when that image cannot be decoded and bad records are
    skipped.
    """

    def __init__(
        self,
        table: Dataset,
        rows: np.ndarray,
        transform: Transform,
        on_bad_record: OnBadRecord = "error",
        streams: np.ndarray | None = None,
    ) -> None:
        if streams is not None and len(streams) != len(rows):
            raise ValueError(f"{len(rows)} rows but {len(streams)} streams")
        self.table, self.rows, self.transform = table, rows, transform
        self.on_bad_record = on_bad_record
        self.streams = streams

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            row = self.table[int(self.rows[index])]
            if self.streams is None:
                return index, self.transform(row_image(row))
            return index, self.transform(stream_image(row, int(self.streams[index])))
        except DataError as err:
            if self.on_bad_record == "error":
                raise
            log.warning("image left out of the feature store, it cannot be read: %s", err)
            return index, None
