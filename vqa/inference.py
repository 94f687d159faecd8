"""Inference: how a batch is run through the model, how logits become answer scores, and the
:class:`Predictor` that answers raw questions about raw images with a trained checkpoint.

:func:`run_model` is the one call of ``VQAModel`` on a :class:`~vqa.data.batch.VQABatch`: the
LightningModule (training, validation, test), checkpoint evaluation and the predictor all go
through it. The predictor's batches come from :class:`~vqa.data.preprocess.Preprocessor`, the
preprocessing of the training and evaluation data, so its answers are those evaluation scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vqa.checkpoint import TrainedModel, load_checkpoint
from vqa.data.batch import VQABatch
from vqa.data.preprocess import ImageInput, Preprocessor
from vqa.models.vqa_model import VQAOutput

# How each training loss's logits become per-answer scores in [0, 1].
SCORE_FUNCTIONS = {"bce": "sigmoid", "ce": "softmax"}


def run_model(model: nn.Module, batch: VQABatch, **drop: Tensor | None) -> VQAOutput:
    """``model`` on ``batch`` (``drop``: modality-dropout masks, training only)."""
    return model(**batch.model_inputs(), **drop)


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
    ``question…`` maps are [N] over ``tokens``.
    """

    question: str
    tokens: list[str]
    answers: list[tuple[str, float]]
    attention: dict[str, Tensor]

    @property
    def answer(self) -> str:
        return self.answers[0][0]


class Predictor:
    """Batched inference on raw images and question strings for a :class:`TrainedModel`."""

    def __init__(self, trained: TrainedModel, device: str | torch.device = "cpu") -> None:
        self.trained = trained
        self.device = torch.device(device)
        self.model = trained.model.to(self.device).eval()
        self.preprocessor = Preprocessor.for_model(trained)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> Predictor:
        return cls(load_checkpoint(path), device)

    def encode(self, images: Sequence[ImageInput], questions: Sequence[str]) -> VQABatch:
        """The batch of ``questions[i]`` about ``images[i]`` on the predictor's device,
        preprocessed exactly like the training data."""
        return self.preprocessor.batch(images, questions).to(self.device)

    @torch.inference_mode()
    def forward(self, batch: VQABatch) -> VQAOutput:
        """Logits and attention maps of a batch (e.g. from :meth:`encode`)."""
        return run_model(self.model, batch)

    def scores(self, logits: Tensor) -> Tensor:
        """Per-answer scores in [0, 1] (:func:`answer_scores` for the checkpoint's loss)."""
        return answer_scores(logits, self.trained.loss)

    @torch.inference_mode()
    def predict_batch(
        self, images: Sequence[ImageInput], questions: Sequence[str], top_k: int = 5
    ) -> list[Prediction]:
        batch = self.encode(images, questions)
        out = self.forward(batch)
        top = self.scores(out.logits.float()).topk(min(top_k, out.logits.shape[1]), dim=-1)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        vocab = self.trained.answer_vocab
        return [
            Prediction(
                question=question,
                tokens=self.preprocessor.tokenizer.convert_ids_to_tokens(
                    batch.input_ids[i, : lengths[i]].tolist()
                ),
                answers=[
                    (vocab.decode(a), s)
                    for a, s in zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True)
                ],
                # question maps are cut to the real tokens (padding holds zero weight)
                attention={
                    k: (v[i, : lengths[i]] if k.startswith("question") else v[i]).float().cpu()
                    for k, v in out.attention.items()
                },
            )
            for i, question in enumerate(questions)
        ]

    def predict(self, image: ImageInput, question: str, top_k: int = 5) -> Prediction:
        return self.predict_batch([image], [question], top_k)[0]
