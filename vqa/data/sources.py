"""Where split tables come from: the small classes a data config picks with ``source._target_``.

A source knows a format, the datamodule knows the data root (``data.root``)::

    source.prepare(root)                    # one-off work (generate, download), rank 0 only
    source.load_split(root, split, bad)     # -> SplitTable, bad records raised or counted

``load_split`` passes its keyword arguments (the datamodule's ``streams=`` and
``conditioning_fields=``) on to the VQA v2 loader, so every source reads them alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from vqa.data.errors import BadRecordLog, DataError
from vqa.data.shapes import (
    MANIFEST_NAME,
    SHAPES_SET,
    SetGenerator,
    ShapesConfig,
    ensure_generated,
    is_current,
)
from vqa.data.shapes_pair import SHAPES_PAIR_SET
from vqa.data.shapes_prior import SHAPES_PRIOR_SET
from vqa.data.table import SplitTable
from vqa.data.vqav2 import load_vqav2_split


class DataSource(Protocol):
    def prepare(self, root: Path | None) -> None: ...

    def load_split(
        self, root: Path | None, split: str, bad: BadRecordLog, **read_options: Any
    ) -> SplitTable: ...


def _require_root(root: Path | None) -> Path:
    if root is None or not Path(root).is_dir():
        raise DataError(
            f"data root {root} is not a folder; set data.root=DIR to the folder holding "
            "Questions/, Annotations/ and Images/mscoco/ (the official VQA v2 layout)",
            field="root",
            reason="missing_file",
        )
    return Path(root)


class VQAv2Source:
    """The official VQA v2 files under the data root (``data=vqav2``)."""

    def prepare(self, root: Path | None) -> None:
        _require_root(root)  # nothing to download: fail in prepare_data, before any worker starts

    def load_split(
        self, root: Path | None, split: str, bad: BadRecordLog, **read_options: Any
    ) -> SplitTable:
        return load_vqav2_split(_require_root(root), split, bad, **read_options)


@dataclass(frozen=True)
class _GeneratedSource(ShapesConfig):
    """A synthetic set, generated into the data root on first use by ``generator``."""

    generator: ClassVar[SetGenerator]

    def prepare(self, root: Path | None) -> None:
        if root is None:
            raise ValueError("the synthetic set needs a data root to be generated into (data.root)")
        ensure_generated(root, self, self.generator)

    def load_split(
        self, root: Path | None, split: str, bad: BadRecordLog, **read_options: Any
    ) -> SplitTable:
        if root is None or not is_current(root, self, self.generator):
            raise DataError(
                f"no up-to-date synthetic set here ({MANIFEST_NAME} missing or made with other "
                "parameters): call datamodule.prepare_data() or "
                f"`python -m {self.generator.name} --out {root}` with the same parameters",
                file=root,
                reason="missing_file",
            )
        return load_vqav2_split(root, split, bad, **read_options)


@dataclass(frozen=True)
class ShapesSource(_GeneratedSource):
    """The synthetic shapes set (``data=shapes``), generated into the data root on first use."""

    generator: ClassVar[SetGenerator] = SHAPES_SET


@dataclass(frozen=True)
class ShapesPairSource(_GeneratedSource):
    """Two images per question (``data=shapes_pair``, streams ``left`` and ``right``; see
    :mod:`vqa.data.shapes_pair`), generated into the data root on first use."""

    generator: ClassVar[SetGenerator] = SHAPES_PAIR_SET


@dataclass(frozen=True)
class ShapesPriorSource(_GeneratedSource):
    """Questions about one quadrant (``data=shapes_prior``, conditioning field ``quadrant``;
    see :mod:`vqa.data.shapes_prior`), generated into the data root on first use."""

    generator: ClassVar[SetGenerator] = SHAPES_PRIOR_SET
