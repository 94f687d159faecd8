"""The one way questions and images become model inputs.

Training and evaluation tokenise their tables with :func:`question_token_ids` (through
:func:`vqa.data.datamodule.encode_batch`) and collate with :class:`~vqa.data.collate.VQACollator`;
prediction and export turn raw strings and images into a :class:`~vqa.data.batch.VQABatch` with
a :class:`Preprocessor`, which uses that same function, the same collator and the evaluation's
image transform. A question therefore gets the same token ids, and an image the same pixels,
wherever it is fed to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from transformers import PreTrainedTokenizerFast

from vqa.data.batch import VQABatch
from vqa.data.collate import VQACollator
from vqa.data.images import build_transform, load_rgb, to_rgb

if TYPE_CHECKING:
    from vqa.checkpoint import TrainedModel

ImageInput = Image.Image | str | Path


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

    A batch holds one image per question (``image_index`` is ``0..B-1``); its questions are
    right-padded to the longest one, as a training batch is. Raw inputs carry no question or
    answer type, so those host records are empty strings.
    """

    tokenizer: PreTrainedTokenizerFast
    max_question_length: int
    image_size: int

    @classmethod
    def for_model(cls, trained: TrainedModel) -> Preprocessor:
        """The preprocessing ``trained`` was trained with (from its checkpoint)."""
        return cls(trained.tokenizer, trained.max_question_length, trained.image_size)

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

    def batch(self, images: Sequence[ImageInput], questions: Sequence[str]) -> VQABatch:
        """A CPU batch of ``questions[i]`` about ``images[i]``."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        return self.collate(
            self.token_ids(questions), [self.pixels(image) for image in images], questions
        )

    def collate(
        self,
        token_ids: Sequence[Sequence[int]],
        pixels: Sequence[Tensor] | Tensor,
        questions: Sequence[str] | None = None,
    ) -> VQABatch:
        """A batch of already tokenised questions and transformed images (one per question),
        padded by the collator of the training and evaluation loaders."""
        if len(token_ids) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(token_ids)} questions")
        texts = [""] * len(token_ids) if questions is None else list(questions)
        samples = [
            {
                "input_ids": ids,
                "image": image,
                "image_id": i,
                "question_id": i,
                "question": text,
                "question_type": "",
                "answer_type": "",
            }
            for i, (ids, image, text) in enumerate(zip(token_ids, pixels, texts, strict=True))
        ]
        return VQACollator(self.tokenizer.pad_token_id, num_answers=0)(samples)
