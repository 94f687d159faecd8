"""The LightningDataModule: split tables -> answer vocabulary, tokenizer, cached encodings ->
batches of images (or cached stage features), padded questions and soft targets.

Built by Hydra from ``configs/data/<name>.yaml``. What the model decides comes from the entry
point, never from the model itself: training hands over which tokenizer to build
(:meth:`VQADataModule.use_tokenizer`, chosen by :func:`vqa.data.tokenizer.tokenizer_spec`) and
the visual encoder's description (:meth:`VQADataModule.use_visual_encoder`); evaluation passes a
checkpoint's ``answer_vocab`` and ``tokenizer`` (see :mod:`vqa.data.artifacts`) so class ids and
token ids match the trained model, and its conditioning vocabulary
(:meth:`VQADataModule.use_conditioning_vocab`) so conditioning values map to the same ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from datasets import Dataset, Features, List, Value
from filelock import FileLock
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerFast

from vqa.data.answers import AnswerVocab, soft_scores
from vqa.data.artifacts import artifacts_to_dict, save_artifacts
from vqa.data.batch import VQABatch
from vqa.data.collate import (
    StaticShapes,
    VQACollator,
    build_conditioning_vocab,
    unknown_conditioning_values,
)
from vqa.data.dataset import VQADataset
from vqa.data.errors import BadRecordLog, DataError, OnBadRecord
from vqa.data.features import (
    FeatureStore,
    FeatureStoreError,
    VisualEncoderDescription,
    require_frozen,
    require_shared_visual_streams,
    split_images,
)
from vqa.data.images import build_transform
from vqa.data.loader import ResumableDataLoader
from vqa.data.preprocess import question_token_ids
from vqa.data.samplers import (
    DistributedImageGroupedSampler,
    ImageGroupedSampler,
    max_images_per_batch,
)
from vqa.data.sources import DataSource
from vqa.data.table import SplitTable, check_names, column
from vqa.data.tokenizer import TokenizerSpec

log = logging.getLogger(__name__)

VisualInput = Literal["images", "cached"]
STATIC_SHAPE_KEYS = ("questions", "images", "tokens")
ENCODING_VERSION = "1"  # bump when encode_batch changes, to invalidate cached encodings
CONDITIONING_VOCAB_FILE = "conditioning_vocab.json"  # beside a run's answer vocabulary
UNKNOWN_EXAMPLES = 3  # unknown conditioning values a warning names
ENCODED_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "target_index": List(Value("int32")),
        "target_score": List(Value("float32")),
    }
)


def encode_batch(
    questions: list[str],
    answers: list[list[str]],
    *,
    tokenizer: PreTrainedTokenizerFast,
    vocab: AnswerVocab,
    max_length: int,
) -> dict[str, list[list[Any]]]:
    """Token ids (:func:`~vqa.data.preprocess.question_token_ids`, as prediction tokenises)
    and sparse soft targets.

    Targets are stored sparse (a few ids per question, not one float per answer) and densified
    per batch.
    """
    input_ids = question_token_ids(tokenizer, questions, max_length)
    scores = [soft_scores(human, vocab) if human else {} for human in answers]
    return {
        "input_ids": input_ids,
        "target_index": [list(s) for s in scores],
        "target_score": [list(s.values()) for s in scores],
    }


def _tokenizer_key(tokenizer: PreTrainedTokenizerFast) -> str:
    """What makes token ids differ: the backend pipeline, minus truncation/padding state that
    calling the tokenizer changes."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True)


class VQADataModule(pl.LightningDataModule):
    """VQA batches from any :class:`~vqa.data.sources.DataSource` (shapes, vqav2, hub).

    After ``setup()``: ``answer_vocab``, ``tokenizer``, ``question_types`` and
    ``question_families`` (sorted, all loaded annotated splits; families only where the
    annotations name them, the synthetic set: else empty) and ``bad_records`` ({split: {reason:
    count}} of skipped records).

    The tokenizer is ``tokenizer`` when given (a checkpoint's), else the one
    :meth:`use_tokenizer` chose, built at ``setup`` (by default a WordPiece vocabulary from the
    training questions).

    ``features="cached"`` reads each split's images as stage maps from
    ``feature_dir/<split>`` (:mod:`vqa.data.features`) instead of decoding them; batches then
    carry ``visual_features`` instead of ``images``. The model's visual encoder, described to
    :meth:`use_visual_encoder`, is checked against the stores (frozen, same stages, channels and
    weights); a trainer refuses to run on stores nothing was checked against.

    ``static_shapes`` ({questions: B, images: U, tokens: N}) pads every training batch to those
    sizes (:class:`~vqa.data.collate.VQACollator`), for CUDA graphs. ``images: null`` takes the
    most distinct images a batch of ``batch_size`` questions can span on the training split
    (:func:`~vqa.data.samplers.max_images_per_batch`), ``tokens: null`` the
    ``max_question_length``; a U below that most raises when the train loader is built, rather
    than at the batch that exceeds it hours into a run. Evaluation batches stay as long as they
    are: they run without gradients, must keep every question, and
    ``torch.compile(dynamic=True)`` or eager serves them.

    ``streams`` (names of the question records' ``image_ids``) reads several images per
    question: batches then carry an [B, K] ``image_index`` over the distinct images of all
    streams (a single stream: the single-image data set of its images, [B]), image-grouped
    batches group questions by their tuple of images, and feature stores hold every stream's
    images. ``conditioning_fields`` reads those question-record keys as categorical labels:
    ``conditioning_vocab`` (per field, the sorted values seen in the training split, built at
    ``setup`` or handed over by :meth:`use_conditioning_vocab`) maps them to the batches'
    ``conditioning_ids`` (0: unknown), and ``unknown_conditioning`` ({split: {field: count}})
    counts the questions of each set-up split that get the unknown id. Neither works with
    ``static_shapes`` yet. Both need a source that reads them (the VQA v2 layout).
    """

    def __init__(
        self,
        source: DataSource,
        root: str | Path | None = None,
        train_split: str = "train2014",
        val_split: str = "val2014",
        test_split: str | None = "val2014",
        vocab_splits: Sequence[str] = ("train2014", "val2014"),
        max_question_length: int = 14,
        image_size: int = 448,
        augment: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        min_answer_count: int = 9,
        on_bad_record: OnBadRecord = "error",
        cache_dir: str | Path | None = None,
        answer_vocab: AnswerVocab | None = None,
        tokenizer: PreTrainedTokenizerFast | None = None,
        group_by_image: bool = False,
        seed: int = 0,
        features: VisualInput = "images",
        feature_dir: str | Path | None = None,
        static_shapes: Mapping[str, int | None] | None = None,
        streams: Sequence[str] | None = None,
        conditioning_fields: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        BadRecordLog(on_bad_record)  # validates the policy name now, not at setup
        streams = check_names(streams, "data.streams")
        conditioning_fields = check_names(conditioning_fields, "data.conditioning_fields")
        if static_shapes is not None and (streams is not None or conditioning_fields is not None):
            raise ValueError(
                "data.static_shapes does not support several images per question "
                "(data.streams) or conditioning fields (data.conditioning_fields) yet: set "
                "data.static_shapes=null"
            )
        if max_question_length < 3:
            raise ValueError(
                f"max_question_length must fit [CLS], a word and [SEP], got {max_question_length}"
            )
        if features not in ("images", "cached"):
            raise ValueError(f"data.features must be 'images' or 'cached', got {features!r}")
        if features == "cached" and feature_dir is None:
            raise ValueError("data.features=cached needs data.feature_dir (the feature store)")
        if features == "cached" and augment:
            raise ValueError(
                "data.features=cached reads maps computed once from un-augmented images: "
                "set data.augment=false"
            )
        # No save_hyperparameters(): Hydra hands over ListConfig/DictConfig values, which would
        # stop checkpoints loading with weights_only=True; the run config travels in the module.
        self.source = source
        self.root = None if root is None else Path(root)
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.vocab_splits = list(vocab_splits)
        self.tokenizer_spec = TokenizerSpec()
        self.max_question_length = max_question_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.min_answer_count = min_answer_count
        self.on_bad_record: OnBadRecord = on_bad_record
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.answer_vocab = answer_vocab
        self.tokenizer = tokenizer
        self.group_by_image, self.seed = group_by_image, seed
        self.question_types: list[str] = []
        self.question_families: list[str] = []
        self.bad_records: dict[str, dict[str, int]] = {}
        self.tables: dict[str, SplitTable] = {}
        self.datasets: dict[str, VQADataset] = {}
        self.image_size = image_size
        self.train_transform = build_transform(image_size, augment)
        self.eval_transform = build_transform(image_size, augment=False)
        self.features: VisualInput = features
        self.feature_dir = None if feature_dir is None else Path(feature_dir)
        self.feature_stores: dict[str, FeatureStore] = {}
        self.visual_encoder: VisualEncoderDescription | None = None
        self._train_position: dict[str, int] | None = None  # from a checkpoint, not yet applied
        self.static_shapes = _static_shapes_config(static_shapes, batch_size, max_question_length)
        self.streams = streams
        self.conditioning_fields = conditioning_fields
        self._conditioning_vocab: dict[str, list[str]] | None = None
        self.unknown_conditioning: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ what the model decides

    def use_tokenizer(self, spec: TokenizerSpec) -> None:
        """Build this tokenizer at ``setup`` (:func:`vqa.data.tokenizer.tokenizer_spec` of the
        text encoder's config); a ready ``tokenizer`` given to the constructor wins."""
        self.tokenizer_spec = spec

    def use_conditioning_vocab(self, vocab: Mapping[str, Sequence[str]]) -> None:
        """Map conditioning values with ``vocab`` (a checkpoint's ``conditioning_vocab``: the
        values its model has embeddings for) instead of building one at ``setup``; before
        ``setup``, whose unknown-value counts use it."""
        if self.conditioning_fields is None:
            raise ValueError(
                "a conditioning vocabulary was handed over, but this data reads no "
                "conditioning fields (data.conditioning_fields is null)"
            )
        if list(vocab) != self.conditioning_fields:
            raise ValueError(
                f"the conditioning vocabulary has fields {list(vocab)} but "
                f"data.conditioning_fields={self.conditioning_fields}: they must be the same, "
                "in the same order"
            )
        if self.datasets:
            raise RuntimeError("use_conditioning_vocab() must be called before setup()")
        self._conditioning_vocab = {field: list(values) for field, values in vocab.items()}

    def require_shared_streams(self, visual_streams: str) -> None:
        """Refuse ``model.visual_streams`` (``shared`` | ``separate``) where the data cannot
        serve it: cached features hold one shared encoder's maps, never one per stream."""
        if self.features == "cached":
            require_shared_visual_streams(visual_streams)

    def use_visual_encoder(self, encoder: VisualEncoderDescription) -> None:
        """The model's visual encoder, described (``model.visual.describe()``): with
        ``features="cached"`` the stores of the set-up splits are checked against it now, and
        those of splits set up later when they are opened."""
        self.visual_encoder = encoder
        if self.features == "cached":
            self._check_visual_encoder(list(self.feature_stores))

    # ------------------------------------------------------------------ what the data holds

    @property
    def stream_names(self) -> list[str] | None:
        """The visual streams read (``data.streams``), in order; None: one image per question."""
        return None if self.streams is None else list(self.streams)

    @property
    def conditioning_vocab(self) -> dict[str, list[str]] | None:
        """Per conditioning field, its known values (index 1 + position; 0 is the unknown):
        built from the training split at ``setup``, or a checkpoint's. None without fields, or
        before ``setup``."""
        if self._conditioning_vocab is None:
            return None
        return {field: list(values) for field, values in self._conditioning_vocab.items()}

    # ------------------------------------------------------------------ loading

    def prepare_data(self) -> None:
        """One-off work: generate the synthetic set, check the root exists.

        Under a file lock beside the caches: Lightning prepares once per node, but nodes share
        the data folder, SLURM starts every rank's script at once, and sweep jobs run side by
        side; two processes generating one folder would pull it from under each other.
        """
        with self._prepare_lock():
            self.source.prepare(self.root)

    def _prepare_lock(self) -> AbstractContextManager[Any]:
        if self.cache_dir is None or self.root is None:
            return nullcontext()  # nothing is written to a shared folder (hub: datasets locks)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        key = hashlib.blake2b(str(self.root.resolve()).encode(), digest_size=8).hexdigest()
        return FileLock(self.cache_dir / f"prepare-{key}.lock")

    def table(self, split: str) -> SplitTable:
        """The loaded split table (loaded once; bad records raised or counted)."""
        if split not in self.tables:
            bad = BadRecordLog(self.on_bad_record)
            # Only what is set: sources that read neither keep their three-argument load_split.
            options = {
                name: value
                for name, value in (
                    ("streams", self.streams),
                    ("conditioning_fields", self.conditioning_fields),
                )
                if value is not None
            }
            self.tables[split] = self.source.load_split(self.root, split, bad, **options)
            self.bad_records[split] = dict(bad.counts)
        return self.tables[split]

    def _stage_splits(self, stage: str | None) -> list[str]:
        by_stage = {
            "fit": [self.train_split, self.val_split],
            "validate": [self.val_split],
            "test": [self.test_split],
            "predict": [self.test_split],
        }
        splits = by_stage.get(stage or "", [self.train_split, self.val_split, self.test_split])
        return list(dict.fromkeys(s for s in splits if s))

    def setup(self, stage: str | None = None) -> None:
        splits = self._stage_splits(stage)
        if self.answer_vocab is None:
            tables = [self.table(s) for s in self.vocab_splits]
            if unannotated := [t.split for t in tables if not t.annotated]:
                raise ValueError(
                    f"vocab_splits {unannotated} have no annotations to build answers from"
                )
            answers = [a for t in tables for a in column(t.table, "multiple_choice_answer")]
            self.answer_vocab = AnswerVocab.build(answers, min_count=self.min_answer_count)
        if self.tokenizer is None:
            self.tokenizer = self.tokenizer_spec.load(
                lambda: column(self.table(self.train_split).table, "question")
            )
        if self.conditioning_fields is not None and self._conditioning_vocab is None:
            values = column(self.table(self.train_split).table, "conditioning")
            self._conditioning_vocab = build_conditioning_vocab(self.conditioning_fields, values)
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)
                self._count_unknown_conditioning(split)
        if self.features == "cached" and self.visual_encoder is not None:
            self._check_visual_encoder(splits)
        elif self.features == "cached" and self.trainer is not None:
            raise FeatureStoreError(
                "data.features=cached, but no visual encoder was described to the datamodule to "
                "check the feature stores against: call "
                "datamodule.use_visual_encoder(model.visual.describe()) before the trainer runs "
                "(vqa.cli.train does)"
            )
        annotated = [t.table for t in self.tables.values() if t.annotated]
        self.question_types = sorted({qt for t in annotated for qt in column(t, "question_type")})
        self.question_families = sorted(
            {
                f
                for t in annotated
                if "question_family" in t.column_names
                for f in column(t, "question_family")
                if f is not None
            }
        )

    def _count_unknown_conditioning(self, split: str) -> None:
        """Count (and warn once per field about) ``split``'s questions whose conditioning value
        is unknown: the model meets them through its learned unknown embedding."""
        if self._conditioning_vocab is None:
            return
        values = column(self.table(split).table, "conditioning")
        unknown = unknown_conditioning_values(self._conditioning_vocab, values)
        self.unknown_conditioning[split] = {field: len(found) for field, found in unknown.items()}
        for field, found in unknown.items():
            if found:
                examples = list(dict.fromkeys(found))[:UNKNOWN_EXAMPLES]
                log.warning(
                    "%s: %d questions have %s values unseen in training (or none) -> the "
                    "learned unknown embedding (e.g. %s)",
                    split,
                    len(found),
                    field,
                    examples,
                )

    def _encoding_key(self, table: SplitTable) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for part in (
            ENCODING_VERSION,
            table.fingerprint,
            _tokenizer_key(self.tokenizer),
            "\n".join(self.answer_vocab.answers),
            str(self.max_question_length),
        ):
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def _dataset(self, split: str) -> VQADataset:
        table = self.table(split)
        key = self._encoding_key(table)
        cache_file = None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            cache_file = str(self.cache_dir / f"encoded-{split}-{key}.arrow")
        # Only the new columns are written (remove_columns), so the cache never copies rows or
        # images; an existing cache file with this content key is loaded instead of recomputed.
        encoded: Dataset = table.table.map(
            encode_batch,
            batched=True,
            input_columns=["question", "answers"],
            remove_columns=table.table.column_names,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "vocab": self.answer_vocab,
                "max_length": self.max_question_length,
            },
            features=ENCODED_FEATURES,
            cache_file_name=cache_file,
            keep_in_memory=cache_file is None,
            load_from_cache_file=True,
            new_fingerprint=key,
            desc=f"Encoding {split}",
        )
        if self.features == "cached":
            rows = self._feature_rows(split, table)
            # The image column of a hub table would be read with every row: drop it.
            rows_only = table.table.remove_columns(
                [c for c in ("image",) if c in table.table.column_names]
            )
            return VQADataset(
                rows_only, encoded, None, table.annotated, self.on_bad_record, feature_rows=rows
            )
        transform = self.train_transform if split == self.train_split else self.eval_transform
        return VQADataset(table.table, encoded, transform, table.annotated, self.on_bad_record)

    # ------------------------------------------------------------------ cached features

    def _feature_rows(self, split: str, table: SplitTable) -> np.ndarray:
        """Open ``split``'s store, check it was made from this data at this image size, and
        return each question's row in it."""
        store = FeatureStore(self.feature_dir / split)
        manifest = store.manifest
        if manifest.image_size != self.image_size:
            raise FeatureStoreError(
                f"{store.directory} was extracted at {manifest.image_size} px but "
                f"data.image_size={self.image_size}: extract again at this size, or point "
                "data.feature_dir at a store made at it"
            )
        if manifest.data_fingerprint != split_images(table.table).fingerprint:
            raise FeatureStoreError(
                f"the images of split {split!r} changed since {store.directory} was extracted "
                "(other ids, files or sizes): extract again (extract.overwrite=true)"
            )
        if self.streams is None:
            image_ids = np.asarray(column(table.table, "image_id"), dtype=np.int64)
        else:  # [N, K]: each question's row of each stream's image
            image_ids = np.asarray(column(table.table, "image_ids"), dtype=np.int64).reshape(
                len(table.table), len(self.streams)
            )
        rows = store.rows_for(image_ids.reshape(-1)).reshape(image_ids.shape)
        if (rows < 0).any() and self.on_bad_record == "error":
            bad = sorted(set(image_ids[rows < 0].tolist()))
            raise DataError(
                f"{len(bad)} image(s) were unreadable at feature extraction (e.g. image_id "
                f"{bad[:5]}); fix them and extract again, or set data.on_bad_record=skip",
                file=store.directory,
                reason="corrupt_image",
            )
        self.feature_stores[split] = store
        return rows

    def _check_visual_encoder(self, splits: Sequence[str]) -> None:
        """The model must read the stores it would compute itself: a frozen encoder (cached
        maps cannot follow trained weights) with the stores' stages, channels and weights."""
        encoder = self.visual_encoder
        if encoder is None:
            return
        require_frozen(encoder)
        for split in splits:
            self.feature_stores[split].check_encoder(encoder)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move a :class:`~vqa.data.batch.VQABatch`'s tensors; its host records stay.

        Lightning's default walks every element of every nested sequence, the ten human answers
        of each question included, which cost a noticeable share of a quick-start step on CPU.
        Other batch types (a caller's own loader) get Lightning's default.
        """
        if isinstance(batch, VQABatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Cached maps travel in the store's dtype (float16: half the copy) and become floats
        on the device, as an encoder's output would be."""
        if isinstance(batch, VQABatch) and batch.visual_features is not None:
            dtype = torch.get_default_dtype()
            return dataclasses.replace(
                batch, visual_features=tuple(f.to(dtype) for f in batch.visual_features)
            )
        return batch

    # ------------------------------------------------------------------ artifacts and loaders

    def _ready(self) -> tuple[AnswerVocab, PreTrainedTokenizerFast]:
        if (
            self.answer_vocab is None
            or self.tokenizer is None
            or (self.conditioning_fields is not None and self._conditioning_vocab is None)
        ):
            raise RuntimeError(
                "the answer vocabulary, tokenizer (and conditioning vocabulary) exist after "
                "setup(); call it first"
            )
        return self.answer_vocab, self.tokenizer

    def save_artifacts(self, run_dir: str | Path) -> None:
        """Write the answer vocabulary and tokenizer beside a run (read back by
        :func:`vqa.data.artifacts.load_artifacts`), and the conditioning vocabulary
        (``conditioning_vocab.json``) where there is one."""
        save_artifacts(run_dir, *self._ready())
        if self._conditioning_vocab is not None:
            (Path(run_dir) / CONDITIONING_VOCAB_FILE).write_text(
                json.dumps(self._conditioning_vocab, indent=2) + "\n", encoding="utf-8"
            )

    def artifacts(self) -> dict[str, Any]:
        """The same, as plain data for a checkpoint (:func:`vqa.data.artifacts.artifacts_from_dict`),
        with ``streams`` and ``conditioning_vocab`` where the data has them."""
        artifacts = artifacts_to_dict(*self._ready())
        if self.streams is not None:
            artifacts["streams"] = self.stream_names
        if self._conditioning_vocab is not None:
            artifacts["conditioning_vocab"] = self.conditioning_vocab
        return artifacts

    def _loader(
        self, split: str | None, shuffle: bool, batch_size: int, static: bool = False
    ) -> DataLoader:
        if split is None or split not in self.datasets:
            raise RuntimeError(
                f"split {split!r} is not set up; call setup() with the matching stage first"
            )
        dataset = self.datasets[split]
        static_shapes = self.train_static_shapes(split) if static else None
        return ResumableDataLoader(
            dataset,
            seed=self.seed,
            batch_size=batch_size,
            sampler=self._sampler(dataset, shuffle),
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=VQACollator(
                self.tokenizer.pad_token_id,
                len(self.answer_vocab),
                features=self.feature_stores.get(split),
                static_shapes=static_shapes,
                conditioning_vocab=self.conditioning_vocab,
            ),
        )

    def train_static_shapes(self, split: str | None = None) -> StaticShapes | None:
        """The training batches' static shapes (None without ``static_shapes``), with
        ``images: null`` resolved and a too small U refused, both from ``split``'s images."""
        if self.static_shapes is None:
            return None
        split = split or self.train_split
        if split not in self.tables:
            raise RuntimeError(f"split {split!r} is not set up; call setup('fit') first")
        needed = max_images_per_batch(
            column(self.table(split).table, "image_id"), self.batch_size, self.group_by_image
        )
        images = self.static_shapes["images"]
        if images is None:
            images = needed
        elif images < needed:
            raise ValueError(
                f"data.static_shapes.images={images} is too small: a batch of "
                f"data.batch_size={self.batch_size} questions can ask about up to {needed} "
                f"distinct images of split {split!r} (its images with the fewest questions, "
                f"one after another); set data.static_shapes.images to at least {needed}, or "
                "null for exactly that"
            )
        shapes = StaticShapes(self.static_shapes["questions"], images, self.static_shapes["tokens"])
        log.info(
            "static batch shapes: %d questions, %d images, %d tokens",
            shapes.questions,
            shapes.images,
            shapes.tokens,
        )
        return shapes

    def _sampler(self, dataset: VQADataset, shuffle: bool) -> Sampler[int] | None:
        """Image-grouped order. Under DDP each rank gets whole images (for evaluation too:
        Lightning's round-robin split would have every rank encode every image).

        Without image grouping every question is its own group: the same (seed, epoch) order
        that can start mid-epoch, rather than a RandomSampler that draws from the run's RNG.
        """
        world_size = 1 if self.trainer is None else self.trainer.world_size
        if not shuffle and (world_size == 1 or not self.group_by_image):
            return None  # table order; under DDP Lightning splits it among the ranks
        if self.group_by_image and self.streams is not None:
            image_ids = [tuple(ids) for ids in column(dataset.table, "image_ids")]
        elif self.group_by_image:
            image_ids = column(dataset.table, "image_id")
        else:
            image_ids = range(len(dataset))
        if world_size > 1:
            return DistributedImageGroupedSampler(
                image_ids,
                num_replicas=world_size,
                rank=self.trainer.global_rank,
                shuffle=shuffle,
                seed=self.seed,
            )
        return ImageGroupedSampler(image_ids, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(
            self.train_split, shuffle=True, batch_size=self.batch_size, static=True
        )
        if self._train_position is not None:
            loader.load_state_dict(self._train_position)
            self._train_position = None
        return loader

    # ------------------------------------------------------------------ exact resume
    # The train loader's position travels as datamodule state rather than as Lightning's loader
    # state: Lightning loads the latter only when it builds the train loader after restoring
    # the loops, but `configure_optimizers` (estimated_stepping_batches) builds it before,
    # so a resumed epoch would start again from its first batch. Datamodule state is
    # restored first, and applied here when the loader is built.
    def state_dict(self) -> dict[str, Any]:
        """Where the train loader is: its epoch and the batches trained on in it."""
        loader = None if self.trainer is None else self.trainer.train_dataloader
        if not isinstance(loader, ResumableDataLoader):
            return {}
        return {"train_loader": loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train_position = state.get("train_loader")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def _static_shapes_config(
    config: Mapping[str, int | None] | None, batch_size: int, max_question_length: int
) -> dict[str, int | None] | None:
    """``data.static_shapes`` checked against the batch size and question length, ``tokens``
    resolved (``images`` needs the data: :meth:`VQADataModule.train_static_shapes`)."""
    if config is None:
        return None
    if not isinstance(config, Mapping) or set(config) - set(STATIC_SHAPE_KEYS):
        raise ValueError(
            f"data.static_shapes must be null or a mapping with keys {list(STATIC_SHAPE_KEYS)}, "
            f"got {config!r}"
        )
    shapes = {key: config.get(key) for key in STATIC_SHAPE_KEYS}
    if shapes["questions"] is None:
        raise ValueError("data.static_shapes.questions is required (usually data.batch_size)")
    if shapes["tokens"] is None:
        shapes["tokens"] = max_question_length
    StaticShapes(shapes["questions"], shapes["images"] or 1, shapes["tokens"])  # types, >= 1
    if shapes["images"] is not None and shapes["images"] < 1:
        raise ValueError(f"data.static_shapes.images must be >= 1, got {shapes['images']}")
    if shapes["questions"] < batch_size:
        raise ValueError(
            f"data.static_shapes.questions={shapes['questions']} is below "
            f"data.batch_size={batch_size}: a batch would not fit; set it to at least "
            f"{batch_size}"
        )
    if shapes["tokens"] < max_question_length:
        raise ValueError(
            f"data.static_shapes.tokens={shapes['tokens']} is below "
            f"data.max_question_length={max_question_length}, the length questions are "
            f"truncated to: set it to at least {max_question_length}, or null for exactly that"
        )
    return shapes
