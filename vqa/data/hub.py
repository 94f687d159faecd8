"""VQA v2 from a Hugging Face Hub dataset (``data=vqav2_hub``), for machines without the files.

The hub copy must carry the official record fields (question_id, image_id, question,
question_type, answer_type, multiple_choice_answer, answers as {answer, answer_confidence,
answer_id}) plus the image, as ``lmms-lab/VQAv2`` does. Its rows get the same checks as the
official files; images stay inside the hub's Arrow cache and are never copied. A copy in the
local caches is used before the network is tried (:func:`vqa.data.hub_access.load_cached_dataset`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, Image, concatenate_datasets, load_dataset

from vqa.data.errors import BadRecordLog, DataError
from vqa.data.hub_access import (
    check_hub_reachable,
    hub_offline,
    hub_unavailable,
    load_cached_dataset,
)
from vqa.data.layout import SPLITS
from vqa.data.table import FEATURES, SplitTable, build_row

# lmms-lab/VQAv2 holds val2014, test-dev and test (no train2014).
DEFAULT_SPLIT_MAP = {"val2014": "validation", "test-dev2015": "testdev", "test2015": "test"}
HUB_FEATURES = FEATURES.copy()
del HUB_FEATURES["image_path"]  # the image is a column of the hub table instead


class HubSource:
    """Loads official split names through ``split_map`` from ``path`` on the hub."""

    def __init__(
        self,
        path: str = "lmms-lab/VQAv2",
        name: str | None = None,
        revision: str | None = None,
        split_map: Mapping[str, str] | None = None,
        image_column: str = "image",
        cache_dir: str | None = None,
    ) -> None:
        self.path, self.name, self.revision = path, name, revision
        self.split_map = dict(split_map if split_map is not None else DEFAULT_SPLIT_MAP)
        self.image_column = image_column
        self.cache_dir = cache_dir

    def _load(self, split: str) -> Dataset:
        if split not in self.split_map or split not in SPLITS:
            raise ValueError(
                f"{self.path}: no hub split mapped to {split!r}; split_map={self.split_map}"
            )
        hub_split = self.split_map[split]
        cached = load_cached_dataset(
            self.path, self.name, hub_split, revision=self.revision, cache_dir=self.cache_dir
        )
        if cached is not None:
            return cached
        what = f"hub dataset {self.path!r} split {hub_split!r}"
        if hub_offline():
            raise hub_unavailable(what)
        check_hub_reachable(what)
        return load_dataset(
            self.path,
            self.name,
            split=hub_split,
            revision=self.revision,
            cache_dir=self.cache_dir,
        )

    def prepare(self, root: Path | None) -> None:
        """Nothing to do up front: ``load_split`` reads the local caches, or downloads into the
        datasets cache, whose file locks make concurrent ranks wait for one download."""

    def load_split(
        self, root: Path | None, split: str, bad: BadRecordLog, **read_options: Any
    ) -> SplitTable:
        if read_options:  # data.streams / data.conditioning_fields: the VQA v2 layout only
            raise ValueError(
                f"the hub source reads one image per question and no conditioning fields; "
                f"{sorted(read_options)} need data in the VQA v2 layout (data=vqav2)"
            )
        hub = self._load(split)
        if self.image_column not in hub.column_names:
            raise DataError(
                f"no image column {self.image_column!r} in {hub.column_names}",
                file=self.path,
                field=self.image_column,
                reason="malformed_record",
            )
        annotated = SPLITS[split][1]  # VQA v2's test splits: no public answers on the hub either
        where = f"hub:{self.path}[{self.split_map[split]}]"
        # Validate the metadata only: without the image column nothing gets decoded.
        records = hub.remove_columns(self.image_column).to_list()
        columns: dict[str, list[Any]] = {name: [] for name in HUB_FEATURES}
        keep: list[int] = []
        digest = hashlib.blake2b(
            f"hub|{self.path}|{self.revision}|{split}".encode(), digest_size=16
        )
        for i, record in enumerate(records):
            try:
                row = build_row(
                    record,
                    record,
                    annotated=annotated,
                    questions_file=where,
                    annotations_file=where,
                )
            except DataError as err:
                bad.handle(err)
                row = dict.fromkeys(HUB_FEATURES, "") | {
                    "question_id": -1,
                    "image_id": -1,
                    "answers": [],
                }
            else:
                keep.append(i)
                digest.update(repr(sorted(row.items())).encode())
            for key in HUB_FEATURES:
                columns[key].append(row[key])
        # Join the checked metadata to the hub's image column before selecting rows: a column
        # join of unselected tables is zero-copy, a selection afterwards is an index mapping.
        # Undecoded (bytes): decoding happens in vqa.data.images, with the same error handling
        # as image files.
        images = hub.select_columns(self.image_column).cast_column(
            self.image_column, Image(decode=False)
        )
        if self.image_column != "image":
            images = images.rename_column(self.image_column, "image")
        table = concatenate_datasets(
            [Dataset.from_dict(columns, features=HUB_FEATURES), images], axis=1
        )
        if len(keep) < len(table):
            table = table.select(keep)
        bad.report(where)
        return SplitTable(
            split=split,
            table=table,
            annotated=annotated,
            fingerprint=digest.hexdigest(),
        )
