"""The one way questions and images become model inputs.

Training and evaluation tokenise their tables with :func:`question_token_ids` (through
:func:`vqa.data.datamodule.encode_batch`) and collate with :class:`~vqa.data.collate.VQACollator`;
prediction and export turn raw strings and images into a :class:`~vqa.data.batch.VQABatch` with
a :class:`Preprocessor`, which uses that same function, the same collator and the evaluation's
image transform. A question therefore gets the same token ids, and an image the same pixels,
wherever it is fed to the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from transformers import PreTrainedTokenizerFast

from vqa.data.batch import VQABatch
from vqa.data.collate import ConditioningVocab, VQACollator, unknown_conditioning_values
from vqa.data.images import build_transform, load_rgb, to_rgb

if TYPE_CHECKING:
    from vqa.checkpoint import TrainedModel

log = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path
# A question's conditioning values by field; a field left out (or None) is unknown.
ConditioningInput = Mapping[str, str | None]


def question_token_ids(
    tokenizer: PreTrainedTokenizerFast, questions: Sequence[str], max_length: int | None
) -> list[list[int]]:
    """Each question's token ids: [CLS] ... [SEP], truncated to ``max_length`` tokens (None:
    not truncated, so a caller can tell a question that does not fit), without token_type_ids
    (the text encoders take ids and a mask only)."""
    return tokenizer(
        list(questions),
        truncation=max_length is not None,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]


def open_image(image: ImageInput) -> Image.Image:
    """A decoded RGB image from a PIL image of any mode or an image file."""
    return to_rgb(image) if isinstance(image, Image.Image) else load_rgb(image)


@dataclass(frozen=True)
class Preprocessor:
    """Raw questions and images to a :class:`~vqa.data.batch.VQABatch`, as a trained model saw
    them: its tokenizer and question length, and the non-augmented transform at its image size.

    A batch holds one image per question (``image_index`` is ``0..B-1``), or for a model of
    several visual streams K images per question, in the model's stream order (``image_index``
    [B, K], every image its own row); its questions are right-padded to the longest one, as a
    training batch is. Raw inputs carry no question or answer type, so those host records are
    empty strings.

    With a ``conditioning_vocab`` (a checkpoint's: the model was trained with conditioning
    fields) each question's values become ``conditioning_ids`` as in training; a value the
    model never saw, or none, maps to the learned unknown embedding (0), with a warning.
    """

    tokenizer: PreTrainedTokenizerFast
    max_question_length: int
    image_size: int
    conditioning_vocab: ConditioningVocab | None = None

    @classmethod
    def for_model(cls, trained: TrainedModel) -> Preprocessor:
        """The preprocessing ``trained`` was trained with (from its checkpoint; the
        conditioning vocabulary travels in its data artifacts,
        :meth:`~vqa.data.datamodule.VQADataModule.artifacts`)."""
        artifacts = trained.hparams.get("data_artifacts") or {}
        return cls(
            trained.tokenizer,
            trained.max_question_length,
            trained.image_size,
            conditioning_vocab=artifacts.get("conditioning_vocab"),
        )

    @cached_property
    def transform(self) -> v2.Compose:
        """The evaluation transform: resize (no crop), scale, normalise; no augmentation."""
        return build_transform(self.image_size, augment=False)

    def token_ids(self, questions: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids as training encodes them; ``truncate=False`` keeps a too long question
        whole (the ids of one that fits are the same either way)."""
        limit = self.max_question_length if truncate else None
        return question_token_ids(self.tokenizer, questions, limit)

    def pixels(self, image: ImageInput) -> Tensor:
        """One image as the model's float tensor [3, image_size, image_size]."""
        return self.transform(open_image(image))

    def batch(
        self,
        images: Sequence[ImageInput | Sequence[ImageInput]],
        questions: Sequence[str],
        conditioning: Sequence[ConditioningInput] | None = None,
    ) -> VQABatch:
        """A CPU batch of ``questions[i]`` about ``images[i]`` (one image, or a list of one per
        visual stream), with ``conditioning[i]`` ({field: value}) where the model takes it."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        pixels = [
            [self.pixels(i) for i in image]
            if isinstance(image, list | tuple)
            else self.pixels(image)
            for image in images
        ]
        return self.collate(self.token_ids(questions), pixels, questions, conditioning)

    def collate(
        self,
        token_ids: Sequence[Sequence[int]],
        pixels: Sequence[Tensor] | Sequence[Sequence[Tensor]] | Tensor,
        questions: Sequence[str] | None = None,
        conditioning: Sequence[ConditioningInput] | None = None,
    ) -> VQABatch:
        """A batch of already tokenised questions and transformed images (one per question, or
        a sequence of K per question for several visual streams), padded by the collator of the
        training and evaluation loaders."""
        if len(token_ids) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(token_ids)} questions")
        texts = [""] * len(token_ids) if questions is None else list(questions)
        samples = [
            {
                "input_ids": ids,
                **_visual_sample(i, image),
                "question_id": i,
                "question": text,
                "question_type": "",
                "answer_type": "",
            }
            for i, (ids, image, text) in enumerate(zip(token_ids, pixels, texts, strict=True))
        ]
        if len({len(s.get("image_ids", ())) for s in samples}) > 1:
            raise ValueError(
                "every question needs the same number of images: one, or one per visual stream"
            )
        if self.conditioning_vocab is not None:
            for sample, values in zip(
                samples, self.conditioning_values(len(samples), conditioning), strict=True
            ):
                sample["conditioning"] = values
        elif conditioning is not None:
            raise ValueError("this model was trained without conditioning fields")
        return VQACollator(
            self.tokenizer.pad_token_id, num_answers=0, conditioning_vocab=self.conditioning_vocab
        )(samples)

    def conditioning_values(
        self, count: int, conditioning: Sequence[ConditioningInput] | None
    ) -> list[tuple[str | None, ...]]:
        """Each of ``count`` questions' values in the vocabulary's field order, warning once per
        field about the questions whose value the model does not know (or that have none)."""
        vocab = self.conditioning_vocab or {}
        fields = list(vocab)
        given = [{}] * count if conditioning is None else list(conditioning)
        if len(given) != count:
            raise ValueError(f"{len(given)} conditioning entries but {count} questions")
        if strangers := sorted({f for entry in given for f in entry} - set(fields)):
            raise ValueError(
                f"unknown conditioning field(s) {strangers}; the model was trained with {fields}"
            )
        values = [tuple(entry.get(field) for field in fields) for entry in given]
        for field, unknown in unknown_conditioning_values(vocab, values).items():
            if unknown:
                log.warning(
                    "%d of %d questions have %s values the model never saw in training (or "
                    "none) -> the learned unknown embedding (e.g. %s)",
                    len(unknown),
                    count,
                    field,
                    list(dict.fromkeys(unknown))[:3],
                )
        return values


def _visual_sample(question: int, image: Tensor | Sequence[Tensor]) -> dict[str, object]:
    """A raw question's image sample: one image, or one per stream, each its own image id."""
    if isinstance(image, Tensor):
        return {"image": image, "image_id": question}
    count = len(image)
    ids = tuple(question * count + k for k in range(count))
    return {"images": list(image), "image_ids": ids, "image_id": ids[0]}
