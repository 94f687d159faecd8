"""Feature cache: a frozen visual encoder's stage maps, computed once per image and read back
by the datamodule (``data.features=cached``) instead of decoding and encoding images.

A frozen backbone is most of the compute of an end-to-end step and its output never changes, so
``python -m vqa.cli.extract`` encodes each image once instead of once per batch and epoch.
One folder per split::

    <data.feature_dir>/<split>/manifest.json  what made it: encoder config, weight digests,
                                              image size, stages and shapes, dtype, data
                                              fingerprint
                               image_ids.npy  sorted image ids; row r holds image_ids[r]
                               features.npy   [N, D] float16 (or float32), memory-mapped: the
                                              stages flattened and concatenated per row
                               status.npy     [N] uint8 per row: 0 pending, 1 written,
                                              2 unreadable image (row left zero)

Rows are computed in fixed chunks; a chunk's features reach the disk before its status does.
An interrupted extraction therefore resumes at the first unfinished chunk and, computing each
chunk exactly as an uninterrupted run would, ends with a byte-identical store.

The encoder is known here only by what it says of itself (:class:`VisualEncoderDescription`,
:class:`StageEncoder`): the data side never imports the model code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from datasets import Dataset
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vqa.data.table import column

log = logging.getLogger(__name__)
FORMAT = "coattn-vqa-features/1"
MANIFEST, IMAGE_IDS, FEATURES, STATUS = (
    "manifest.json",
    "image_ids.npy",
    "features.npy",
    "status.npy",
)
PENDING, WRITTEN, UNREADABLE = 0, 1, 2
DTYPES = ("float16", "float32")
# Manifest fields that must agree for two runs' rows to share a store. batch_size is left out:
# a resumed run adopts the stored one, because chunk boundaries decide the exact bytes.
IDENTITY_FIELDS = (
    "format",
    "split",
    "encoder",
    "stages",
    "digests",
    "image_size",
    "dtype",
    "num_images",
    "data_fingerprint",
)
# Encoder settings that change only training, never an eval-mode forward.
TRAINING_ONLY_KEYS = ("freeze", "gradient_checkpointing")


class FeatureStoreError(RuntimeError):
    """A store that is missing, incomplete, or made with other settings than the ones asked for."""


class VisualEncoderDescription(Protocol):
    """What a visual encoder says of itself (the model side's ``VisualEncoderSpec``): the stages
    it returns in network order, their channels, a digest per stage of every weight that stage's
    map depends on, and whether it is frozen (cached maps cannot follow trained weights)."""

    @property
    def stages(self) -> tuple[str, ...]: ...

    @property
    def frozen(self) -> bool: ...

    @property
    def trainable(self) -> tuple[str, ...]: ...

    def stage_channels(self) -> dict[str, int]: ...

    def stage_digests(self) -> dict[str, str]: ...


class StageEncoder(Protocol):
    """A visual encoder as extraction uses it (the model side's ``ResNetEncoder``): images to
    {stage name: map}, its [C, H, W] map shapes at an image size, and its description."""

    def __call__(self, images: Tensor) -> Mapping[str, Tensor]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def stage_shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]: ...

    def describe(self) -> VisualEncoderDescription: ...


@dataclass(frozen=True)
class Stage:
    """One stored stage: its name and the [C, H, W] shape of its map."""

    name: str
    shape: tuple[int, int, int]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Manifest:
    """What made a store; two stores with equal identity fields hold interchangeable rows."""

    split: str
    encoder: dict[str, Any]
    stages: tuple[Stage, ...]
    digests: dict[str, str]
    image_size: int
    dtype: str
    num_images: int
    data_fingerprint: str
    batch_size: int
    format: str = FORMAT

    @property
    def row_size(self) -> int:
        return sum(stage.size for stage in self.stages)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["stages"] = tuple(Stage(s["name"], tuple(s["shape"])) for s in data["stages"])
        return cls(**data)

    def differences(self, other: Manifest) -> dict[str, tuple[Any, Any]]:
        """Identity fields whose values differ, as {field: (self's, other's)}."""
        mine, theirs = asdict(self), asdict(other)
        return {k: (mine[k], theirs[k]) for k in IDENTITY_FIELDS if mine[k] != theirs[k]}


# ------------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class SplitImages:
    """The distinct images of a split: sorted ids, the first table row showing each, and a
    content key (ids, file names and sizes) that changes when the images do.

    With several images per question (an ``image_ids`` column), every stream's images count,
    each once, and ``streams`` holds the stream (position in the row's ``image_ids``) of that
    first row that shows it; None for single-image tables.
    """

    image_ids: np.ndarray
    rows: np.ndarray
    fingerprint: str
    streams: np.ndarray | None = None


def split_images(table: Dataset) -> SplitImages:
    """The distinct images of a split table. File sizes make a regenerated or re-downloaded
    image set differ from the stored one; hub tables (images inside the table, pinned by the
    hub revision) are keyed by their ids.

    The key depends on the images only, not on how questions use them: a store extracted for
    the single-image data set of one stream serves ``data.streams=[that stream]`` as well, and
    one for another set of images is refused."""
    if "image_ids" in table.column_names:
        return _stream_images(table)
    ids = np.asarray(column(table, "image_id"), dtype=np.int64)
    image_ids, rows = np.unique(ids, return_index=True)
    digest = hashlib.blake2b(image_ids.tobytes(), digest_size=16)
    if "image_path" in table.column_names:
        paths = column(table, "image_path")
        for row in rows.tolist():
            _digest_file(digest, paths[row])
    return SplitImages(image_ids, rows, digest.hexdigest())


def _stream_images(table: Dataset) -> SplitImages:
    """:func:`split_images` over every stream of a table with ``image_ids``/``image_paths``."""
    ids = np.asarray(column(table, "image_ids"), dtype=np.int64)  # [N, K]
    num_streams = ids.shape[1] if ids.ndim == 2 else 1
    image_ids, first = np.unique(ids.reshape(-1), return_index=True)  # row-major: row, stream
    rows, streams = np.divmod(first, num_streams)
    digest = hashlib.blake2b(image_ids.tobytes(), digest_size=16)
    paths = column(table, "image_paths")
    for row, stream in zip(rows.tolist(), streams.tolist(), strict=True):
        _digest_file(digest, paths[row][stream])
    return SplitImages(image_ids, rows, digest.hexdigest(), streams)


def _digest_file(digest: Any, path: str) -> None:
    size = os.stat(path).st_size if os.path.exists(path) else -1
    digest.update(f"{os.path.basename(path)}:{size}\n".encode())


def read_manifest(directory: str | Path) -> Manifest | None:
    path = Path(directory) / MANIFEST
    return Manifest.from_json(path.read_text(encoding="utf-8")) if path.is_file() else None


def store_complete(directory: str | Path) -> bool:
    """Whether ``directory`` holds a finished store, whatever settings made it."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():  # written last: a folder without one is no store
        return False
    return not (np.load(directory / STATUS) == PENDING).any()


def require_frozen(encoder: VisualEncoderDescription) -> None:
    """Cached maps are what a frozen encoder computes: refuse one that would still train."""
    if not encoder.frozen:
        trainable = encoder.trainable
        raise FeatureStoreError(
            "data.features=cached needs a frozen visual encoder (model.visual.freeze=all): "
            f"{len(trainable)} of its parameters are trainable (e.g. {trainable[0]})"
        )


def require_shared_visual_streams(visual_streams: str) -> None:
    """Cached maps come from one encoder shared by every stream: refuse one encoder per stream
    (``model.visual_streams=separate``), whose streams each see other weights."""
    if visual_streams == "separate":
        raise FeatureStoreError(
            "data.features=cached cannot serve model.visual_streams=separate: a feature store "
            "holds the maps of one frozen encoder, and separate encoders are one per stream. "
            "Use model.visual_streams=shared, or data.features=images"
        )


def build_manifest(
    encoder: StageEncoder,
    encoder_config: dict[str, Any],
    split: str,
    images: SplitImages,
    image_size: int,
    dtype: str,
    batch_size: int,
) -> Manifest:
    """The manifest ``encoder`` would write for ``images``: its stages, their map shapes at
    ``image_size`` and their weight digests (from the encoder's own description)."""
    if dtype not in DTYPES:
        raise ValueError(f"feature dtype must be one of {DTYPES}, got {dtype!r}")
    description = encoder.describe()
    shapes = encoder.stage_shapes(image_size)
    digests = description.stage_digests()
    stages = tuple(Stage(name, tuple(shapes[name])) for name in description.stages)
    return Manifest(
        split=split,
        encoder={k: v for k, v in encoder_config.items() if k not in TRAINING_ONLY_KEYS},
        stages=stages,
        digests={s.name: digests[s.name] for s in stages},
        image_size=image_size,
        dtype=dtype,
        num_images=len(images.image_ids),
        data_fingerprint=images.fingerprint,
        batch_size=batch_size,
    )


# ------------------------------------------------------------------------------- writing


class _NpyRows:
    """Row writes into an existing ``.npy`` file at its data offset, durable when flushed."""

    def __init__(self, path: Path) -> None:
        array = np.load(path, mmap_mode="r")
        self.offset, self.row_bytes = array.offset, array.itemsize * math.prod(array.shape[1:])
        del array
        self.fd = os.open(path, os.O_RDWR)

    def write(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows).tobytes()
        os.pwrite(self.fd, data, self.offset + start * self.row_bytes)

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class FeatureWriter:
    """Creates a split's store, or reopens a partly written one made with the same manifest.

    A store whose manifest differs is refused (rows from two encoders, image sizes or data sets
    must never mix) unless ``overwrite`` replaces it.
    """

    def __init__(
        self, directory: str | Path, manifest: Manifest, image_ids: np.ndarray, overwrite: bool
    ) -> None:
        self.directory = Path(directory)
        existing = read_manifest(self.directory)
        if existing is not None and not overwrite:
            if differences := existing.differences(manifest):
                detail = "; ".join(
                    f"{k}: stored {old!r}, asked {new!r}" for k, (old, new) in differences.items()
                )
                raise FeatureStoreError(
                    f"{self.directory} holds features made with other settings ({detail}). "
                    "Point data.feature_dir elsewhere, or pass extract.overwrite=true to replace "
                    "them."
                )
            # Same identity: resume with the stored chunking, so rows come out byte-identical.
            manifest = replace(manifest, batch_size=existing.batch_size)
        else:
            self._create(manifest, image_ids)
        self.manifest = manifest
        self.status = np.load(self.directory / STATUS)
        if existing is not None and not overwrite:
            log.info(
                "%s: %d of %d images already stored, continuing in chunks of %d",
                self.directory,
                int((self.status != PENDING).sum()),
                manifest.num_images,
                manifest.batch_size,
            )
        self._features = _NpyRows(self.directory / FEATURES)
        self._status = _NpyRows(self.directory / STATUS)

    def _create(self, manifest: Manifest, image_ids: np.ndarray) -> None:
        """Files first, the manifest last (atomically): a folder without a manifest is never
        mistaken for a store, and is simply created again."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / MANIFEST).unlink(missing_ok=True)
        np.save(self.directory / IMAGE_IDS, image_ids.astype(np.int64))
        np.save(self.directory / STATUS, np.zeros(len(image_ids), dtype=np.uint8))
        # Allocated sparse: the zeros of pending rows take no disk space.
        shape = (len(image_ids), manifest.row_size)
        allocated = np.lib.format.open_memmap(
            self.directory / FEATURES, mode="w+", dtype=manifest.dtype, shape=shape
        )
        del allocated  # unmaps; rows are written through _NpyRows
        tmp = self.directory / f".{MANIFEST}.tmp"
        tmp.write_text(manifest.to_json(), encoding="utf-8")
        os.replace(tmp, self.directory / MANIFEST)

    def pending_chunks(self) -> list[range]:
        """Row ranges still to compute, on the fixed chunk grid of ``manifest.batch_size``."""
        size, total = self.manifest.batch_size, self.manifest.num_images
        chunks = (range(start, min(start + size, total)) for start in range(0, total, size))
        return [c for c in chunks if (self.status[c.start : c.stop] == PENDING).any()]

    def write(self, chunk: range, features: np.ndarray, unreadable: np.ndarray) -> None:
        """Store a chunk's rows (zeros where ``unreadable``), then mark it done."""
        self._features.write(chunk.start, features)
        self._features.flush()
        status = np.where(unreadable, UNREADABLE, WRITTEN).astype(np.uint8)
        self._status.write(chunk.start, status)
        self._status.flush()
        self.status[chunk.start : chunk.stop] = status

    def close(self) -> None:
        self._features.close()
        self._status.close()


@dataclass(frozen=True)
class ExtractionReport:
    """What one split's extraction did; ``seconds`` covers decoding and encoding."""

    split: str
    directory: Path
    num_images: int
    computed: int
    unreadable: int
    seconds: float
    bytes_per_image: int

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")


def _collate_chunk(items: list[tuple[int, Tensor | None]]) -> tuple[Tensor | None, Tensor]:
    """Stack a chunk's readable images; the mask marks the unreadable ones."""
    unreadable = torch.tensor([pixels is None for _, pixels in items])
    kept = [pixels for _, pixels in items if pixels is not None]
    return (torch.stack(kept) if kept else None), unreadable


def encode_rows(encoder: StageEncoder, pixels: Tensor, manifest: Manifest) -> np.ndarray:
    """[n, row_size] stage maps, flattened and concatenated in the manifest's stage order, in
    the store's dtype."""
    with torch.inference_mode():
        named = encoder(pixels)
    maps = [named[s.name] for s in manifest.stages]
    flat = torch.cat([m.flatten(1) for m in maps], dim=1).to(getattr(torch, manifest.dtype))
    if not torch.isfinite(flat).all():
        peaks = {s.name: float(m.abs().amax()) for s, m in zip(manifest.stages, maps, strict=True)}
        hint = (
            "extract with extract.dtype=float32, or use an encoder whose activations are "
            "normalised (pretrained weights)"
            if manifest.dtype == "float16"
            else "the encoder itself produces non-finite values"
        )
        raise FeatureStoreError(
            f"stage maps do not fit {manifest.dtype} (largest magnitudes {peaks}): {hint}"
        )
    return flat.cpu().numpy()


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} img/s" if task.speed else "")


@contextmanager
def _progress(enabled: bool, description: str, total: int, done: int) -> Iterator[Any]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not enabled) as progress:
        yield progress, progress.add_task(description, total=total, completed=done)


def extract_split(
    encoder: StageEncoder,
    images: torch.utils.data.Dataset,
    writer: FeatureWriter,
    *,
    num_workers: int = 0,
    progress: bool = True,
) -> ExtractionReport:
    """Encode the writer's pending chunks with ``encoder`` (already in eval mode on its device).

    ``images`` yields ``(row, pixels or None)`` per store row (:class:`~vqa.data.dataset.
    DistinctImages`). Each chunk is one batch, so a resumed run batches exactly like a fresh one.
    """
    manifest = writer.manifest
    device = next(encoder.parameters()).device
    chunks = writer.pending_chunks()
    loader = DataLoader(
        images,
        batch_sampler=[list(c) for c in chunks],
        num_workers=num_workers,
        collate_fn=_collate_chunk,
        pin_memory=device.type == "cuda",
    )
    computed = sum(len(c) for c in chunks)
    start = time.perf_counter()
    with _progress(
        progress, f"{manifest.split}", manifest.num_images, manifest.num_images - computed
    ) as (bar, task):
        for chunk, (pixels, unreadable) in zip(chunks, loader, strict=True):
            rows = np.zeros((len(chunk), manifest.row_size), dtype=manifest.dtype)
            if pixels is not None:
                encoded = encode_rows(encoder, pixels.to(device, non_blocking=True), manifest)
                rows[~unreadable.numpy()] = encoded
            writer.write(chunk, rows, unreadable.numpy())
            bar.advance(task, len(chunk))
    return ExtractionReport(
        split=manifest.split,
        directory=writer.directory,
        num_images=manifest.num_images,
        computed=computed,
        unreadable=int((writer.status == UNREADABLE).sum()),
        seconds=time.perf_counter() - start,
        bytes_per_image=manifest.row_size * np.dtype(manifest.dtype).itemsize,
    )


# ------------------------------------------------------------------------------- reading


class FeatureStore:
    """A complete store, memory-mapped read-only; what the datamodule batches come from.

    Picklable without the mapping (DataLoader workers reopen it), so workers share the page
    cache instead of copying the array.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise FeatureStoreError(
                f"no feature store at {self.directory}: run `python -m vqa.cli.extract` "
                "with the same data and model/visual overrides as training first"
            )
        status = np.load(self.directory / STATUS)
        if pending := int((status == PENDING).sum()):
            raise FeatureStoreError(
                f"{self.directory} is incomplete: {pending} of {len(status)} images not "
                "extracted yet (interrupted?); run -m vqa.cli.extract again to resume"
            )
        self.manifest = manifest
        self.image_ids = np.load(self.directory / IMAGE_IDS)
        self.unreadable = status == UNREADABLE
        starts = np.cumsum([0, *(s.size for s in manifest.stages)]).tolist()
        self._columns = {
            s.name: (start, start + s.size)
            for s, start in zip(manifest.stages, starts, strict=False)
        }
        self.stages: tuple[Stage, ...] = manifest.stages
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.directory / FEATURES, mmap_mode="r")
        return self._array

    def rows_for(self, image_ids: np.ndarray) -> np.ndarray:
        """The row of each image id (-1 where the image was unreadable at extraction)."""
        rows = np.searchsorted(self.image_ids, image_ids)
        found = (rows < len(self.image_ids)) & (
            self.image_ids[np.minimum(rows, len(self.image_ids) - 1)] == image_ids
        )
        if not found.all():
            missing = np.unique(image_ids[~found])
            raise FeatureStoreError(
                f"{self.directory} has no features for {len(missing)} image(s) of this split "
                f"(e.g. image_id {missing[:5].tolist()}): extract them again "
                "(extract.overwrite=true)"
            )
        return np.where(self.unreadable[rows], -1, rows)

    def use_stages(self, names: Sequence[str]) -> None:
        """Read only ``names`` (in network order) from now on."""
        stored = {s.name: s for s in self.manifest.stages}
        if missing := [n for n in names if n not in stored]:
            raise FeatureStoreError(
                f"the model reads stages {list(names)} but {self.directory} holds only "
                f"{list(stored)} (missing {missing}): extract with model.visual.stages="
                f"[{','.join(names)}]"
            )
        self.stages = tuple(stored[n] for n in names)

    def check_encoder(self, encoder: VisualEncoderDescription) -> None:
        """Refuse an encoder (its description) other than the one that made the store, and read
        its stages from now on. Stages, channels and weights must match, or a checkpoint trained
        on these features would evaluate on images with a visual encoder it never saw."""
        self.use_stages(encoder.stages)
        widths = {s.name: s.shape[0] for s in self.stages}
        channels = encoder.stage_channels()
        if channels != widths:
            raise FeatureStoreError(
                f"the model's visual stages have {channels} channels, {self.directory} holds "
                f"{widths} (made by {self.manifest.encoder})"
            )
        deepest = encoder.stages[-1]
        if encoder.stage_digests()[deepest] != self.manifest.digests[deepest]:
            raise FeatureStoreError(
                f"the model's visual encoder weights differ from the ones that made "
                f"{self.directory} ({self.manifest.encoder}): extract with the same "
                "model/visual config, weights and seed as training"
            )

    def read(self, rows: Sequence[int]) -> list[Tensor]:
        """The selected stages of ``rows``: one [len(rows), C, H, W] tensor per stage, each
        read on its own so unselected stages never leave the disk."""
        index = np.asarray(rows, dtype=np.int64)
        return [
            torch.from_numpy(self.array[index, slice(*self._columns[s.name])]).view(
                len(index), *s.shape
            )
            for s in self.stages
        ]
