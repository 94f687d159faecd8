"""Inference: how a batch is run through the model, how logits become answer scores, and the
:class:`Predictor` that answers raw questions about raw images with a trained checkpoint.

:func:`run_model` is the one call of ``VQAModel`` on a :class:`~vqa.data.batch.VQABatch`: the
LightningModule (training, validation, test), checkpoint evaluation and the predictor's
:meth:`Predictor.forward` all go through it. The predictor's inputs come from
:class:`~vqa.data.preprocess.Preprocessor`, the preprocessing of the training and evaluation
data, so its answers are those evaluation scores.

:meth:`Predictor.predict` / :meth:`Predictor.predict_batch` answer interactively: load once,
answer many. Each distinct image is encoded on its own (visual encoder, then the fusion block's
question-independent ``prepare_visual``) and kept in a bounded LRU cache keyed by a digest of
its decoded pixels, so a follow-up question about an image already seen runs the text encoder,
the fusion and the head only. Inputs are checked before any model work; what cannot be answered
raises :class:`InputError`, whose message is meant for the person who typed the question.

A model of several visual streams (``data.streams``: a left and a right image, say) takes one
image per stream for each question, as a sequence in the checkpoint's stream order or a mapping
from stream name to image; a model trained with conditioning fields (``data.conditioning_fields``)
takes each question's labels as a mapping from field to value, and maps a value it never saw in
training (or none) to its learned unknown embedding, with a warning.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from vqa.checkpoint import TrainedModel, load_checkpoint
from vqa.data.batch import VQABatch
from vqa.data.collate import conditioning_ids, conditioning_index
from vqa.data.errors import DataError
from vqa.data.images import load_rgb, to_rgb
from vqa.data.preprocess import ConditioningInput, ImageInput, Preprocessor
from vqa.models.conditioning import add_to_maps, film
from vqa.models.packed_linear import pack_linears, packed_linear_available
from vqa.models.streams import StreamEncoders
from vqa.models.vqa_model import VQAModel, VQAOutput

# How each training loss's logits become per-answer scores in [0, 1].
SCORE_FUNCTIONS = {"bce": "sigmoid", "ce": "softmax"}
# What Predictor does with a question longer than the model's max_question_length.
LONG_QUESTIONS = ("refuse", "truncate")
LongQuestions = Literal["refuse", "truncate"]
DEFAULT_CACHE_SIZE = 32
# What the predictor accepts as an image: a PIL image of any mode, an image file, the encoded
# bytes of one (an upload), or an array of pixels (H x W [x 3|4], uint8).
RawImage = ImageInput | bytes | np.ndarray
# A question's images for a model of several visual streams: one per stream, in the checkpoint's
# stream order, or by stream name. A single-image model takes one RawImage.
StreamImages = Sequence[RawImage] | Mapping[str, RawImage]


class InputError(ValueError):
    """A question or image the predictor cannot answer. The message says what is wrong in
    words meant for the person who typed the question or chose the image (no traceback
    needed); raised before any model work."""


def run_model(model: nn.Module, batch: VQABatch, **drop: Tensor | None) -> VQAOutput:
    """``model`` on ``batch`` (``drop``: modality-dropout masks, training only)."""
    return model(**batch.model_inputs(), **drop)


def model_preprocessor(trained: TrainedModel) -> Preprocessor:
    """The preprocessing ``trained`` was trained with (:meth:`Preprocessor.for_model`), mapping
    conditioning labels with the vocabulary its model records: a checkpoint's data artifacts
    carry it, and so do the hyper-parameters of any :class:`TrainedModel` (an export's)."""
    preprocessor = Preprocessor.for_model(trained)
    if preprocessor.conditioning_vocab is None and trained.conditioning_vocab is not None:
        return dataclasses.replace(preprocessor, conditioning_vocab=trained.conditioning_vocab)
    return preprocessor


def score_function(loss: str) -> str:
    """``sigmoid`` for a BCE-trained model (its answers are scored independently, as its soft
    targets are), ``softmax`` for a cross-entropy one."""
    if loss not in SCORE_FUNCTIONS:
        raise ValueError(f"loss must be one of {tuple(SCORE_FUNCTIONS)}, got {loss!r}")
    return SCORE_FUNCTIONS[loss]


def answer_scores(logits: Tensor, loss: str) -> Tensor:
    """Per-answer scores in [0, 1] of logits [B, A] (see :func:`score_function`)."""
    if score_function(loss) == "sigmoid":
        return logits.sigmoid()
    return logits.softmax(dim=-1)


@dataclass
class Prediction:
    """One question's top answers, its tokens and its attention maps (CPU tensors).

    ``attention`` keys are the fusion block's: ``image…`` maps are [H_s, W_s] over the grid,
    ``question…`` maps are [N] over ``tokens``. ``image_cached``: the image's features came
    from the predictor's cache (a follow-up question about an image already seen; with
    several streams: every one of its images).

    ``streams``: the model's visual streams when it reads several images per question (None
    otherwise); each stream's maps are then keyed ``image/<stream>…`` and
    ``question/<stream>…``. ``conditioning``: the question's labels by field as the model read
    them (None where a field had no value; None for a model without conditioning fields).
    """

    question: str
    tokens: list[str]
    answers: list[tuple[str, float]]
    attention: dict[str, Tensor]
    image_cached: bool = False
    streams: list[str] | None = None
    conditioning: dict[str, str | None] | None = None

    @property
    def answer(self) -> str:
        return self.answers[0][0]


class Answered(NamedTuple):
    """What :meth:`Predictor.run` gives: each question's token ids, the model's output (logits
    [B, A], attention maps) and whether each question's image came from the cache."""

    token_ids: list[list[int]]
    output: VQAOutput
    image_cached: list[bool]


# ------------------------------------------------------------------------------- inputs


def read_image(image: RawImage) -> Image.Image:
    """A decoded RGB image, or an :class:`InputError` that names the problem (missing file, a
    folder, not an image, corrupt or truncated data, an unsupported object)."""
    try:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, np.ndarray):
            return to_rgb(Image.fromarray(image))
        if isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image)
            if not data:
                raise InputError("the image is empty (0 bytes)")
            return _decode(lambda: load_rgb(data, name="upload"), "the uploaded data")
        if isinstance(image, str | os.PathLike):
            path = Path(image)
            if not str(image).strip():
                raise InputError("no image given (empty path)")
            if path.is_dir():
                raise InputError(f"{path} is a folder, not an image file")
            if not path.is_file():
                raise InputError(f"image not found: {path}")
            return _decode(lambda: load_rgb(path), str(path))
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(f"the image is too large to decode safely ({err})") from None
    except (TypeError, ValueError, OSError) as err:  # PIL on an odd array or a lazy image
        raise InputError(f"the image cannot be decoded ({err})") from None
    raise InputError(
        "expected an image: a PIL image, a file path, encoded image bytes or a pixel array, "
        f"not {type(image).__name__}"
    )


def _decode(load: Callable[[], Image.Image], what: str) -> Image.Image:
    try:
        return load()
    except Image.DecompressionBombError as err:
        raise InputError(f"{what} is too large to decode safely ({err})") from None
    except DataError as err:
        cause = err.__cause__
        if isinstance(cause, FileNotFoundError):
            raise InputError(f"image not found: {what}") from None
        if isinstance(cause, UnidentifiedImageError):
            detail = "not an image format that can be read (PNG, JPEG, GIF, BMP, WebP, ...)"
        else:
            detail = f"corrupt or truncated image data ({cause or err})"
        raise InputError(f"{what} cannot be read as an image: {detail}") from None


def image_digest(image: Image.Image) -> str:
    """Identity of a decoded RGB image: a hash of its size and pixels. The same picture
    uploaded twice, as a file or as a PIL image, gets the same digest; any other pixel
    content another one. The evaluation transform is a function of the pixels alone, so equal
    digests mean equal model inputs."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheStats:
    """Counters of the predictor's image-feature cache since it was created or cleared."""

    hits: int
    misses: int
    size: int  # images held now
    capacity: int  # at most this many (0: caching off)

    @property
    def lookups(self) -> int:
        return self.hits + self.misses


class FeatureCache:
    """A thread-safe LRU map from image digest to that image's prepared visual features.

    Only the dictionary operations hold the lock: two threads that miss on the same new image
    both compute its features (identical), and the second store is a no-op refresh.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[str, list[Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get(self, key: str) -> list[Tensor] | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: str, value: list[Tensor]) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._hits = self._misses = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries), self.capacity)


# ------------------------------------------------------------------------------- predictor


class Predictor:
    """Answers raw questions about raw images with a :class:`TrainedModel`.

    ``cache_size``: how many images' encoded features (visual encoder + the fusion block's
    ``prepare_visual``) are kept, least recently used dropped first; 0 turns the cache off.
    ``long_questions``: a question longer than the model's ``max_question_length`` tokens
    ([CLS] and [SEP] included) raises :class:`InputError` (``"refuse"``, the default) or is
    cut to that length as training and evaluation cut it (``"truncate"``).
    ``cpu_packed_linear``: a serving option, off by default. On CPU with MKL, the predictor
    answers with its own copy of the model (the ``TrainedModel``'s is left as it is) whose fp32
    linear layers (text encoder, fusion, head) are :class:`PackedLinear`: a follow-up question
    is answered faster, with logits that differ from the plain model's by float rounding
    (not bit-identical). Elsewhere (CUDA, no MKL) it is a no-op with a warning;
    ``packed_linears`` says how many layers were packed (0: the plain model).

    Thread-safe: several threads may call :meth:`predict` at once (a demo server); only the
    cache and the tokenizer are locked, never the model's forward pass.
    """

    def __init__(
        self,
        trained: TrainedModel,
        device: str | torch.device = "cpu",
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        long_questions: LongQuestions = "refuse",
        cpu_packed_linear: bool = False,
    ) -> None:
        if long_questions not in LONG_QUESTIONS:
            raise ValueError(
                f"long_questions must be one of {LONG_QUESTIONS}, got {long_questions!r}"
            )
        self.trained = trained
        self.device = torch.device(device)
        self.preprocessor = model_preprocessor(trained)
        self.packed_linears = 0
        if cpu_packed_linear and self.device.type == "cpu" and packed_linear_available():
            self.model = copy.deepcopy(trained.model).to(self.device).eval()
            self.packed_linears = pack_linears(self.model, self.preprocessor.max_question_length)
        else:
            if cpu_packed_linear:
                warnings.warn(
                    "cpu_packed_linear is for CPU with MKL "
                    f"(device {self.device}, MKL {'available' if packed_linear_available() else 'unavailable'}); "
                    "answering with the plain model",
                    stacklevel=2,
                )
            self.model = trained.model.to(self.device).eval()
        self.long_questions = long_questions
        self.cache = FeatureCache(cache_size)
        # The fast tokenizer's Rust object is mutably borrowed when its truncation settings
        # change; concurrent calls could then fail with "Already borrowed".
        self._tokenizer_lock = threading.Lock()
        self._pad_id = int(trained.tokenizer.pad_token_id)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        long_questions: LongQuestions = "refuse",
        cpu_packed_linear: bool = False,
    ) -> Predictor:
        return cls(
            load_checkpoint(path),
            device,
            cache_size=cache_size,
            long_questions=long_questions,
            cpu_packed_linear=cpu_packed_linear,
        )

    # -- inputs ---------------------------------------------------------------------------

    @property
    def max_question_length(self) -> int:
        """Tokens a question may have, [CLS] and [SEP] included."""
        return self.preprocessor.max_question_length

    @property
    def streams(self) -> list[str] | None:
        """The visual streams the model reads, in order (None: one image per question)."""
        return None if self.model.streams is None else list(self.model.streams)

    @property
    def conditioning_fields(self) -> list[str]:
        """The conditioning fields the model takes (none: [])."""
        return list(self.preprocessor.conditioning_vocab or {})

    def question_ids(self, questions: Sequence[str]) -> list[list[int]]:
        """Each question's token ids, as training encodes them; :class:`InputError` for an
        empty question, or (``long_questions="refuse"``) one longer than the model reads."""
        for i, question in enumerate(questions):
            if not isinstance(question, str):
                raise InputError(
                    f"{_which(i, len(questions))}the question must be text, not "
                    f"{type(question).__name__}"
                )
            if not question.strip():
                raise InputError(f"{_which(i, len(questions))}the question is empty")
        limit = self.max_question_length
        with self._tokenizer_lock:
            ids = self.preprocessor.token_ids(questions, truncate=self.long_questions == "truncate")
        for i, row in enumerate(ids):
            which = _which(i, len(questions))
            if len(row) <= 2:  # [CLS] [SEP]: nothing the tokenizer keeps
                raise InputError(f"{which}the question has no words (only {questions[i]!r})")
            if len(row) > limit:
                raise InputError(
                    f"{which}the question is too long: {len(row)} tokens ([CLS] and [SEP] "
                    f"included), this model reads at most {limit}; shorten it by "
                    f"{len(row) - limit} token(s)"
                )
        return ids

    def read_images(self, images: Sequence[RawImage]) -> list[Image.Image]:
        """Decoded RGB images; :class:`InputError` names the first that cannot be read."""
        decoded = []
        for i, image in enumerate(images):
            try:
                decoded.append(read_image(image))
            except InputError as err:
                raise InputError(f"{_which(i, len(images))}{err}") from None
        return decoded

    def stream_images(self, image: RawImage | StreamImages, which: str = "") -> list[RawImage]:
        """A question's images in the model's stream order: one image for a single-image
        model; one per stream (a sequence in stream order, or a mapping by stream name) for a
        model of several streams. :class:`InputError` when the count or the names do not fit
        (``which`` prefixes the message: the question of a batch it is about)."""
        streams = self.streams
        count = 1 if streams is None else len(streams)
        if isinstance(image, Mapping):
            if streams is None:
                raise InputError(
                    f"{which}this model reads one image per question, not images by stream "
                    f"name (got {sorted(map(str, image))})"
                )
            missing = [s for s in streams if s not in image]
            unexpected = sorted(str(name) for name in image if name not in streams)
            if missing or unexpected:
                raise InputError(
                    f"{which}this model reads the images {_listed(streams)}; "
                    + "; ".join(
                        part
                        for part in (
                            f"missing {_listed(missing)}" if missing else "",
                            f"unexpected {_listed(unexpected)}" if unexpected else "",
                        )
                        if part
                    )
                )
            return [image[s] for s in streams]
        if isinstance(image, list | tuple):
            if len(image) != count:
                raise InputError(f"{which}{_image_count(streams)}, got {len(image)}")
            return list(image)
        if count != 1:
            raise InputError(f"{which}{_image_count(streams)}, got one")
        return [image]

    def question_images(self, images: Sequence[RawImage | StreamImages]) -> list[list[Image.Image]]:
        """Each question's decoded images, one per stream in stream order (a single-image model:
        one); :class:`InputError` names the first that cannot be used."""
        decoded = []
        for i, image in enumerate(images):
            which = _which(i, len(images))
            raw = self.stream_images(image, which)
            names = self.streams if len(raw) > 1 else [None]
            row = []
            for name, one in zip(names, raw, strict=True):
                try:
                    row.append(read_image(one))
                except InputError as err:
                    stream = "" if name is None else f"the {name} image: "
                    raise InputError(f"{which}{stream}{err}") from None
            decoded.append(row)
        return decoded

    def conditioning_labels(
        self, count: int, conditioning: Sequence[ConditioningInput | None] | None
    ) -> list[dict[str, str | None]] | None:
        """Each of ``count`` questions' labels by field, checked (None: a model without
        conditioning fields). :class:`InputError` for labels given to a model without fields,
        a field the model does not know, or a label that is not text; a field left out, or
        None, is unknown."""
        given = None if conditioning is None else list(conditioning)
        if given is not None and len(given) != count:
            raise ValueError(f"{len(given)} conditioning entries but {count} questions")
        fields = self.conditioning_fields
        if self.preprocessor.conditioning_vocab is None:
            if given is not None and any(given):
                named = sorted({str(f) for entry in given if entry for f in entry})
                raise InputError(
                    f"this model was trained without conditioning fields: it takes no labels "
                    f"(got {named})"
                )
            return None
        labels: list[dict[str, str | None]] = []
        for i, entry in enumerate(given or [None] * count):
            which = _which(i, count)
            if entry is not None and not isinstance(entry, Mapping):
                raise InputError(
                    f"{which}conditioning labels must map each field to its value, not "
                    f"{type(entry).__name__}"
                )
            entry = dict(entry or {})
            if strangers := sorted(str(f) for f in entry if f not in fields):
                raise InputError(
                    f"{which}unknown conditioning field(s) {strangers}: this model was trained "
                    f"with {fields}"
                )
            for field, value in entry.items():
                if value is not None and not isinstance(value, str):
                    raise InputError(
                        f"{which}the {field} label must be text, not {type(value).__name__}"
                    )
            labels.append(entry)
        return labels

    def conditioning_values(
        self, count: int, conditioning: Sequence[ConditioningInput | None] | None
    ) -> list[tuple[str | None, ...]] | None:
        """Each of ``count`` questions' labels in the model's field order (None: a model
        without conditioning fields), checked by :meth:`conditioning_labels`. A value the
        model never saw in training, or none, goes to the learned unknown embedding: logged,
        one warning per field."""
        labels = self.conditioning_labels(count, conditioning)
        return None if labels is None else self.preprocessor.conditioning_values(count, labels)

    def conditioning_ids(self, values: Sequence[Sequence[str | None]] | None) -> Tensor | None:
        """[B, F] long on the predictor's device: each label's index in the checkpoint's
        vocabulary (0, the unknown, for None or an unseen value), as the training batches
        have them; None for a model without conditioning fields."""
        vocab = self.preprocessor.conditioning_vocab
        if values is None or vocab is None:
            return None
        index = list(conditioning_index(vocab).values())
        return conditioning_ids(index, values).to(self.device)

    def encode(
        self,
        images: Sequence[RawImage | StreamImages],
        questions: Sequence[str],
        conditioning: Sequence[ConditioningInput | None] | None = None,
    ) -> VQABatch:
        """The batch of ``questions[i]`` about ``images[i]`` (with ``conditioning[i]``) on the
        predictor's device, preprocessed exactly like the training data (inputs checked as
        :meth:`predict` does)."""
        _same_length(images, questions)
        ids = self.question_ids(questions)
        decoded = self.question_images(images)
        labels = self.conditioning_labels(len(questions), conditioning)
        pixels = [
            [self.preprocessor.pixels(one) for one in row]
            if len(row) > 1
            else self.preprocessor.pixels(row[0])
            for row in decoded
        ]
        return self.preprocessor.collate(ids, pixels, questions, labels).to(self.device)

    # -- model ----------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: VQABatch) -> VQAOutput:
        """Logits and attention maps of a batch (e.g. from :meth:`encode`), by
        :func:`run_model` (no cache)."""
        return run_model(self.model, batch)

    def scores(self, logits: Tensor) -> Tensor:
        """Per-answer scores in [0, 1] (:func:`answer_scores` for the checkpoint's loss)."""
        return answer_scores(logits, self.trained.loss)

    @property
    def _conditions_maps(self) -> bool:
        """Labels are added to the stage maps before ``prepare_visual``: its output is then per
        question, and the cache holds the encoder's maps instead."""
        return self.model.conditioning is not None and self.model.conditioning_inject == "visual"

    def _cache_key(self, digest: str, stream: int) -> str:
        """What an image's cached features are for stream ``stream``: the image's digest alone
        for a single-image model (prepared features), else also the fusion block (prepared
        features) or visual encoder (stage maps) that made them, where streams have their own."""
        if self._conditions_maps:
            separate = isinstance(self.model.visual, StreamEncoders)
            return f"{digest}/maps" + (f"/{stream}" if separate else "")
        if self.model.num_streams == 1:
            return digest
        if self.model.fusion.shared and not isinstance(self.model.visual, StreamEncoders):
            # One encoder and one fusion block serve every stream (model.stream_fusion=shared):
            # an image's prepared features are the same whichever stream shows it.
            return f"{digest}/prepared"
        return f"{digest}/{self.model.streams[stream]}"

    @torch.inference_mode()
    def image_features(self, image: Image.Image, stream: int = 0) -> list[Tensor]:
        """One decoded image's cached features for stream ``stream`` (each [1, ...]): the visual
        encoder's stage maps through that stream's fusion block's question-independent
        ``prepare_visual``, or the stage maps alone where the model adds conditioning labels
        to them (``prepare_visual`` is then per question). Always a batch of one, so an image's
        features, and its answers, do not depend on the other images of a call or on what the
        cache holds."""
        pixels = self.preprocessor.pixels(image).unsqueeze(0).to(self.device)
        maps = self.model.encode_image(pixels, stream=stream)
        if self._conditions_maps:
            return list(maps)
        return list(self.model.fusion_blocks()[stream].prepare_visual(maps))

    def visual_rows(
        self, images: Sequence[Image.Image], stream: int = 0
    ) -> tuple[list[Tensor], Tensor, list[bool]]:
        """Cached features (:meth:`image_features`) of the distinct images [U, ...], each
        image's row [B] and whether it came from the cache, computing (and caching) those not
        seen before; ``images``: each question's image of stream ``stream``."""
        rows: dict[str, int] = {}
        image_index: list[int] = []
        distinct: list[list[Tensor]] = []
        hits: list[bool] = []  # per distinct image
        for image in images:
            key = self._cache_key(image_digest(image), stream)
            if key not in rows:
                features = self.cache.get(key)
                hits.append(features is not None)
                if features is None:
                    features = self.image_features(image, stream)
                    self.cache.put(key, features)
                rows[key] = len(distinct)
                distinct.append(features)
            image_index.append(rows[key])
        cached = [hits[row] for row in image_index]
        parts = [
            parts[0] if len(parts) == 1 else torch.cat(parts)
            for parts in zip(*distinct, strict=True)
        ]
        return parts, torch.tensor(image_index, device=self.device), cached

    def pad(self, token_ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """``input_ids`` and ``attention_mask`` [B, N], right-padded to the longest question
        with the pad token, as the training collator pads."""
        width = max(len(row) for row in token_ids)
        ids = [[*row, *[self._pad_id] * (width - len(row))] for row in token_ids]
        mask = [[1] * len(row) + [0] * (width - len(row)) for row in token_ids]
        return (
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(mask, dtype=torch.long, device=self.device),
        )

    @torch.inference_mode()
    def answer(
        self,
        features: Sequence[Sequence[Tensor]],
        image_index: Tensor,
        input_ids: Tensor,
        mask: Tensor,
        conditioning_ids: Tensor | None = None,
    ) -> VQAOutput:
        """The per-question rest of ``VQAModel.forward`` (inference: no modality dropout, no
        static-shape padding) on each stream's cached features [U_k, ...] (``features[k]``,
        :meth:`visual_rows`), ``image_index`` [B, K] (column k: each question's row of
        ``features[k]``) and the labels' ids [B, F]: the same operations on the same tensors,
        so the same logits."""
        model: VQAModel = self.model
        condition = None
        if model.conditioning is not None:
            if conditioning_ids is None:
                conditioning_ids = model.conditioning.unknown_ids(len(input_ids), input_ids.device)
            condition = model.conditioning(conditioning_ids)
        text = model.text(input_ids, mask)
        if condition is not None and model.conditioning_inject == "question":
            text = film(text, condition)
        prepared = []
        for k, (block, parts) in enumerate(zip(model.fusion_blocks(), features, strict=True)):
            rows = [part.index_select(0, image_index[:, k]) for part in parts]
            if self._conditions_maps:
                rows = list(block.prepare_visual(add_to_maps(rows, condition)))
            prepared.append(rows)
        fused = model.fuse(prepared, text, mask.bool())
        return VQAOutput(logits=model.head(fused.features), attention=fused.attention)

    @torch.inference_mode()
    def run(
        self,
        images: Sequence[RawImage | StreamImages],
        questions: Sequence[str],
        conditioning: Sequence[ConditioningInput | None] | None = None,
    ) -> Answered:
        """Logits and attention maps of each ``questions[i]`` about ``images[i]`` (one image,
        or one per stream) with ``conditioning[i]`` (labels by field), through the
        image-feature cache; inputs checked first (:class:`InputError`, before model work)."""
        return self._run(images, questions, conditioning)[0]

    def _run(
        self,
        images: Sequence[RawImage | StreamImages],
        questions: Sequence[str],
        conditioning: Sequence[ConditioningInput | None] | None,
    ) -> tuple[Answered, list[tuple[str | None, ...]] | None]:
        _same_length(images, questions)
        token_ids = self.question_ids(questions)
        decoded = self.question_images(images)
        values = self.conditioning_values(len(questions), conditioning)
        features, columns, cached = [], [], [True] * len(questions)
        for k in range(self.model.num_streams):
            parts, index, hits = self.visual_rows([row[k] for row in decoded], k)
            features.append(parts)
            columns.append(index)
            cached = [a and b for a, b in zip(cached, hits, strict=True)]
        input_ids, mask = self.pad(token_ids)
        output = self.answer(
            features, torch.stack(columns, dim=1), input_ids, mask, self.conditioning_ids(values)
        )
        return Answered(token_ids, output, cached), values

    @torch.inference_mode()
    def predict_batch(
        self,
        images: Sequence[RawImage | StreamImages],
        questions: Sequence[str],
        top_k: int = 5,
        conditioning: Sequence[ConditioningInput | None] | None = None,
    ) -> list[Prediction]:
        """The ``top_k`` answers of each ``questions[i]`` about ``images[i]``: one image, or
        for a model of several visual streams one per stream (a sequence in the checkpoint's
        stream order, or a mapping by stream name); ``conditioning[i]``: the question's labels
        by field, for a model trained with conditioning fields.

        :class:`InputError` (before any model work) for an empty question, a question longer
        than the model reads (unless ``long_questions="truncate"``), an unreadable image, a
        wrong number (or wrong names) of images, or labels of a field the model does not
        know. An unseen label is no error: it goes to the unknown embedding, with a warning."""
        (token_ids, out, cached), values = self._run(images, questions, conditioning)
        top = self.scores(out.logits.float()).topk(min(top_k, out.logits.shape[1]), dim=-1)
        indices, values_top = top.indices.tolist(), top.values.tolist()
        attention = {k: v.float().cpu() for k, v in out.attention.items()}
        convert = self.preprocessor.tokenizer.convert_ids_to_tokens
        vocab = self.trained.answer_vocab
        streams = self.streams if self.model.num_streams > 1 else None
        fields = self.conditioning_fields
        return [
            Prediction(
                question=question,
                tokens=convert(list(token_ids[i])),
                answers=[
                    (vocab.decode(a), s) for a, s in zip(indices[i], values_top[i], strict=True)
                ],
                # question maps are cut to the real tokens (padding holds zero weight)
                attention={
                    k: v[i, : len(token_ids[i])] if k.startswith("question") else v[i]
                    for k, v in attention.items()
                },
                image_cached=cached[i],
                streams=streams,
                conditioning=(
                    None if values is None else dict(zip(fields, values[i], strict=True))
                ),
            )
            for i, question in enumerate(questions)
        ]

    def predict(
        self,
        image: RawImage | StreamImages,
        question: str,
        top_k: int = 5,
        *,
        conditioning: ConditioningInput | None = None,
    ) -> Prediction:
        """The ``top_k`` answers to ``question`` about ``image`` (for a model of several
        visual streams: its images, in stream order or by stream name) with the labels
        ``conditioning`` ({field: value}; see :meth:`predict_batch`)."""
        labels = None if conditioning is None else [conditioning]
        return self.predict_batch([image], [question], top_k, labels)[0]

    # -- cache ----------------------------------------------------------------------------

    def cache_stats(self) -> CacheStats:
        """Hits, misses, images held and capacity of the image-feature cache."""
        return self.cache.stats()

    def clear_cache(self) -> None:
        """Forget every cached image and reset the counters."""
        self.cache.clear()


def _which(index: int, count: int) -> str:
    """Which input of a batch a message is about ("" for a single one)."""
    return "" if count == 1 else f"input {index + 1} of {count}: "


def _listed(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _image_count(streams: Sequence[str] | None) -> str:
    """What a model reads per question, for a message about a wrong number of images."""
    if streams is None:
        return "this model reads one image per question"
    return (
        f"this model reads {len(streams)} image(s) per question, one per stream "
        f"({_listed(streams)}, in that order)"
    )


def _same_length(images: Sequence[object], questions: Sequence[str]) -> None:
    if isinstance(questions, str):
        raise TypeError("questions must be a sequence of strings (use predict for one)")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
