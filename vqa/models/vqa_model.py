"""The network: visual encoder + text encoder -> fusion block -> answer head.

Hydra builds the encoders and hands over the fusion block and head as partials, because
only the encoders know the sizes those need (stage channels, text width, fused width).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vqa.models.fusion.base import FusionBlock
from vqa.models.norms import padding_rows

# Same scale as BERT's embedding init: a null input starts as an ordinary, small feature.
NULL_INIT_STD = 0.02


@dataclass
class VQAOutput:
    """Answer logits [B, A] and the fusion block's attention maps (for plotting)."""

    logits: Tensor
    attention: dict[str, Tensor] = field(default_factory=dict)


class VQAModel(nn.Module):
    """Images (or cached stage features) + question tokens -> answer logits.

    Modality dropout lives here because it replaces intermediate features: a sample with
    ``drop_image`` sees a learned null vector (per stage) at every grid cell, a sample
    with ``drop_question`` a single learned null token (the other positions become padding,
    so masked softmaxes stay defined). The attribute names ``visual``, ``text``, ``fusion``
    and ``head`` are relied on to build optimizer parameter groups.

    ``visual`` returns its stage maps by name in network order and lists their widths in
    ``out_channels`` (:class:`~vqa.models.visual.ResNetEncoder`); fusion blocks get the maps as
    a list in that order.
    """

    def __init__(
        self,
        visual: nn.Module,
        text: Callable[..., nn.Module] | nn.Module,
        fusion: Callable[..., FusionBlock],
        head: Callable[..., nn.Module],
        num_answers: int,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        # A ready module keeps its own vocabulary; a partial is sized to the tokenizer.
        self.text = text if isinstance(text, nn.Module) else text(vocab_size=vocab_size)
        self.visual_channels = list(visual.out_channels)
        self.fusion = fusion(visual_channels=self.visual_channels, text_dim=self.text.hidden_size)
        self.head = head(in_features=self.fusion.out_dim, num_answers=num_answers)
        # One vector as wide as the widest stage; stage s uses its first C_s entries. Separate
        # per-stage parameters would leave those of stages a single-scale fusion never reads
        # without gradient, which DDP rejects.
        self.null_image = nn.Parameter(torch.randn(max(self.visual_channels)) * NULL_INIT_STD)
        self.null_question = nn.Parameter(torch.randn(self.text.hidden_size) * NULL_INIT_STD)

    def encode_image(self, images: Tensor) -> list[Tensor]:
        """Stage feature maps of the visual encoder in network order (what a feature cache
        stores); the encoder returns them by stage name."""
        return list(self.visual(images).values())

    def forward(
        self,
        images: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        visual_features: Sequence[Tensor] | None = None,
        image_index: Tensor | None = None,
        drop_image: Tensor | None = None,
        drop_question: Tensor | None = None,
        question_valid: Tensor | None = None,
        image_valid: Tensor | None = None,
    ) -> VQAOutput:
        """Exactly one of ``images`` / ``visual_features``; ``drop_*`` are [B] bool masks.

        ``image_index`` [B] maps each question to its row of ``images``/``visual_features``
        when a batch carries each distinct image once (None: one image per question).
        ``question_valid`` [B] / ``image_valid`` [U] bool mark the real rows of a static-shape
        batch: batch norms in train mode then ignore the padding rows (``vqa.models.norms``).
        """
        if (images is None) == (visual_features is None):
            raise ValueError("pass exactly one of images or visual_features")
        if input_ids is None or attention_mask is None:
            raise ValueError("input_ids and attention_mask are required")
        with padding_rows(image_valid):
            visual = self.encode_image(images) if visual_features is None else list(visual_features)
        if [stage.shape[1] for stage in visual] != self.visual_channels:
            raise ValueError(
                f"visual stages have {[stage.shape[1] for stage in visual]} channels, the model "
                f"was built for {self.visual_channels}"
            )
        if drop_image is not None:
            # The null image is one more row, which dropped questions point to.
            null_row = len(visual[0])
            if image_index is None:
                image_index = torch.arange(null_row, device=drop_image.device)
            image_index = torch.where(drop_image, null_row, image_index)
            visual = [
                torch.cat(
                    [
                        stage,
                        self.null_image[: stage.shape[1]]
                        .to(stage.dtype)
                        .view(1, -1, 1, 1)
                        .expand(1, -1, *stage.shape[2:]),
                    ]
                )
                for stage in visual
            ]
        # Per distinct image first, then repeated per question (FusionBlock.prepare_visual).
        rows = self._prepare_rows(
            image_valid, image_index, drop_image, question_valid, len(visual[0])
        )
        with padding_rows(rows):
            prepared = self.fusion.prepare_visual(visual)
        if image_index is not None:
            prepared = [part.index_select(0, image_index) for part in prepared]
        with padding_rows(question_valid):
            text = self.text(input_ids, attention_mask)
        mask = attention_mask.bool()

        if drop_question is not None:
            text = torch.where(
                drop_question.view(-1, 1, 1), self.null_question.to(text.dtype), text
            )
            first_only = torch.arange(mask.shape[1], device=mask.device) == 0
            mask = torch.where(drop_question.unsqueeze(1), first_only, mask)

        with padding_rows(question_valid):
            fused = self.fusion.fuse(prepared, text, mask)
            logits = self.head(fused.features)
        return VQAOutput(logits=logits, attention=fused.attention)

    @staticmethod
    def _prepare_rows(
        image_valid: Tensor | None,
        image_index: Tensor | None,
        drop_image: Tensor | None,
        question_valid: Tensor | None,
        rows: int,
    ) -> Tensor | None:
        """The rows ``prepare_visual``'s batch norms take their statistics over: a [rows]
        weight per image row (``vqa.models.norms.padding_rows``).

        With modality dropout, each image row (the null image's included) weighs as many
        questions as read it, which is what a per-question computation would give: an image
        that no question reads any more (its questions all dropped it) then neither shapes the
        statistics the null image is normalised with nor receives gradient through them, so a
        model trained with ``image_dropout=1`` learns nothing from images. Otherwise: the valid
        image rows (all of them without static shapes).
        """
        if drop_image is None or image_index is None:
            return image_valid
        weights = (
            torch.ones_like(image_index, dtype=torch.float32)
            if question_valid is None
            else question_valid.to(torch.float32)
        )
        # index_add, not bincount: bincount reads the largest index back on the host.
        return weights.new_zeros(rows).index_add_(0, image_index, weights)
