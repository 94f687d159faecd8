"""The network: visual encoder + text encoder -> fusion block -> answer head.

Hydra builds the encoders and hands over the fusion block, head and combiner as partials,
because only the encoders know the sizes those need (stage channels, text width, fused width).

Two optional extensions, both absent by default (the model is then exactly the single-image
one, parameter for parameter): several named images per question (``streams``, one fusion
block each, a combiner; ``vqa.models.streams``) and per-question categorical labels
(``conditioning``; ``vqa.models.conditioning``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vqa.models.conditioning import ConditioningEmbedding, add_to_maps, film
from vqa.models.fusion.base import FusionBlock, FusionOutput
from vqa.models.norms import padding_rows
from vqa.models.streams import STREAM_FUSIONS, StreamEncoders, StreamFusion, check_streams

# Same scale as BERT's embedding init: a null input starts as an ordinary, small feature.
NULL_INIT_STD = 0.02
CONDITIONING_INJECT = ("visual", "question")


@dataclass
class VQAOutput:
    """Answer logits [B, A] and the fusion block's attention maps (for plotting)."""

    logits: Tensor
    attention: dict[str, Tensor] = field(default_factory=dict)


def data_model_args(
    streams: Sequence[str] | None, conditioning_vocab: Mapping[str, Sequence[str]] | None
) -> dict[str, Any]:
    """The :class:`VQAModel` arguments the data decides: ``streams`` (the datamodule's stream
    names) and ``conditioning`` (the number of known values of each field of the datamodule's
    conditioning vocabulary, in ``conditioning_ids`` column order). Only those the data has:
    a model without them is built exactly as before they existed. The train CLI builds with
    them; ``vqa.checkpoint`` rebuilds with them from what the lit module recorded."""
    args: dict[str, Any] = {}
    if streams is not None:
        args["streams"] = list(streams)
    if conditioning_vocab is not None:
        args["conditioning"] = {field: len(values) for field, values in conditioning_vocab.items()}
    return args


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

    ``streams`` (K names) reads K images per question: ``image_index`` [B, K]. With K > 1 each
    stream runs a block from the ``fusion`` partial (its own, or with ``stream_fusion="shared"``
    one block all streams run) and ``combiner`` (a partial, built with
    ``in_features``/``num_streams``) merges their features for the head (``fusion`` is then a
    :class:`~vqa.models.streams.StreamFusion`); ``stream_embedding`` tells each stream's block
    which stream it reads (:class:`~vqa.models.streams.StreamEmbedding` on its question
    tokens); ``visual_streams="separate"`` gives each stream its own copy of ``visual``
    (``visual`` is then a :class:`~vqa.models.streams.StreamEncoders`). ``drop_image`` drops
    every stream of a question. One stream is the single-image model.

    ``conditioning`` (field -> number of known values) adds one learned vector per question,
    the sum of its fields' embeddings (``conditioning_ids`` [B, F], 0 = unknown), injected by
    ``conditioning_inject``: ``visual`` adds it to every cell of each stage map of the question's
    image(s), its first C_s entries at stage s (one vector as wide as the widest stage, as the
    null image: separate per-stage parameters would leave those of stages a single-scale
    fusion never reads without gradient, which DDP rejects); the maps then become per question.
    ``question`` modulates the text tokens (FiLM, ``t * (1 + gamma) + beta``).

    New modules are created after the single-image model's, and only when used, so a seed
    gives the single-image model the same initial weights with or without these arguments.
    """

    def __init__(
        self,
        visual: nn.Module,
        text: Callable[..., nn.Module] | nn.Module,
        fusion: Callable[..., FusionBlock],
        head: Callable[..., nn.Module],
        num_answers: int,
        vocab_size: int | None = None,
        streams: Sequence[str] | None = None,
        visual_streams: str = "shared",
        stream_fusion: str = "separate",
        stream_embedding: bool = False,
        combiner: Callable[..., nn.Module] | None = None,
        conditioning: Mapping[str, int] | None = None,
        conditioning_inject: str = "visual",
    ) -> None:
        super().__init__()
        self.streams = check_streams(streams, visual_streams)
        self.num_streams = 1 if self.streams is None else len(self.streams)
        if conditioning_inject not in CONDITIONING_INJECT:
            raise ValueError(
                f"conditioning_inject={conditioning_inject!r} must be one of {CONDITIONING_INJECT}"
            )
        if self.num_streams > 1 and combiner is None:
            raise ValueError(
                f"{self.num_streams} streams need a combiner (the `combiner` config group)"
            )
        # Separate encoders only matter with several streams: one stream has one encoder.
        self.visual_streams = visual_streams if self.num_streams > 1 else "shared"
        self.conditioning_inject = conditioning_inject
        self.visual = (
            StreamEncoders(visual, self.num_streams)
            if self.visual_streams == "separate"
            else visual
        )
        # A ready module keeps its own vocabulary; a partial is sized to the tokenizer.
        self.text = text if isinstance(text, nn.Module) else text(vocab_size=vocab_size)
        self.visual_channels = list(visual.out_channels)
        if self.num_streams == 1:
            self.fusion = fusion(
                visual_channels=self.visual_channels, text_dim=self.text.hidden_size
            )
        else:
            if stream_fusion not in STREAM_FUSIONS:
                raise ValueError(f"stream_fusion={stream_fusion!r} must be one of {STREAM_FUSIONS}")
            blocks = [
                fusion(visual_channels=self.visual_channels, text_dim=self.text.hidden_size)
                for _ in (self.streams if stream_fusion == "separate" else self.streams[:1])
            ]
            merge = combiner(in_features=blocks[0].out_dim, num_streams=self.num_streams)
            self.fusion = StreamFusion(
                blocks,
                merge,
                self.streams,
                text_dim=self.text.hidden_size if stream_embedding else None,
            )
        self.head = head(in_features=self.fusion.out_dim, num_answers=num_answers)
        # One vector as wide as the widest stage; stage s uses its first C_s entries. Separate
        # per-stage parameters would leave those of stages a single-scale fusion never reads
        # without gradient, which DDP rejects.
        self.null_image = nn.Parameter(torch.randn(max(self.visual_channels)) * NULL_INIT_STD)
        self.null_question = nn.Parameter(torch.randn(self.text.hidden_size) * NULL_INIT_STD)
        self.conditioning: ConditioningEmbedding | None = None
        if conditioning:
            width = (
                max(self.visual_channels)
                if conditioning_inject == "visual"
                else 2 * self.text.hidden_size
            )
            self.conditioning = ConditioningEmbedding(conditioning, width)

    @property
    def conditioning_fields(self) -> list[str]:
        """The conditioning fields in ``conditioning_ids`` column order (none: [])."""
        return [] if self.conditioning is None else list(self.conditioning.fields)

    def fusion_blocks(self) -> list[FusionBlock]:
        """The fusion block of each stream, in stream order (one without streams)."""
        if isinstance(self.fusion, StreamFusion):
            return self.fusion.stream_blocks()
        return [self.fusion]

    def fuse(
        self,
        prepared: Sequence[Sequence[Tensor]],
        text: Tensor,
        mask: Tensor,
        question_valid: Tensor | None = None,
    ) -> FusionOutput:
        """Each stream's per-question ``prepare_visual`` output (``prepared[k]``) fused with the
        question tokens [B, N, D] and, with several streams, combined."""
        if self.num_streams == 1:
            return self.fusion.fuse(prepared[0], text, mask)
        return self.fusion(prepared, text, mask, question_valid)

    def encode_image(self, images: Tensor, stream: int | None = None) -> list[Tensor]:
        """Stage feature maps of the visual encoder in network order (what a feature cache
        stores); the encoder returns them by stage name. Separate encoders need ``stream``,
        the index of the stream whose encoder to run."""
        if isinstance(self.visual, StreamEncoders):
            if stream is None:
                raise ValueError(
                    "this model has one visual encoder per stream (visual_streams=separate): "
                    "pass stream=<index> to encode_image"
                )
            return list(self.visual[stream](images).values())
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
        conditioning_ids: Tensor | None = None,
    ) -> VQAOutput:
        """Exactly one of ``images`` / ``visual_features``; ``drop_*`` are [B] bool masks.

        ``image_index`` [B] maps each question to its row of ``images``/``visual_features``
        when a batch carries each distinct image once (None: one image per question); with
        streams it is [B, K], column k the row of the question's stream-k image.
        ``question_valid`` [B] / ``image_valid`` [U] bool mark the real rows of a static-shape
        batch: batch norms in train mode then ignore the padding rows (``vqa.models.norms``).
        ``conditioning_ids`` [B, F] long: each question's value index per conditioning field
        (None with conditioning: every field unknown).
        """
        if (images is None) == (visual_features is None):
            raise ValueError("pass exactly one of images or visual_features")
        if input_ids is None or attention_mask is None:
            raise ValueError("input_ids and attention_mask are required")
        image_index = self._check_image_index(image_index, input_ids.shape[0])
        condition = self._conditioning_vector(conditioning_ids, input_ids)
        # One list of stage maps per encoder: the shared one's serves every stream.
        encoded = self._encode(images, visual_features, image_index, image_valid, question_valid)
        if drop_image is not None:
            # The null image is one more row, which dropped questions point to.
            encoded = [self._with_null_image(visual) for visual in encoded]

        stacked = isinstance(self.fusion, StreamFusion) and self.fusion.shared and len(encoded) == 1
        if stacked:
            # One shared block, one encoder: every stream's questions in one stream-major batch,
            # so the block prepares each distinct image once and fuses once.
            repeat = self.num_streams
            prepared = self._prepare_stream(
                self.fusion.blocks[0],
                encoded[0],
                image_index.T.reshape(-1),
                None if drop_image is None else drop_image.repeat(repeat),
                None if condition is None else condition.repeat(repeat, 1),
                image_valid,
                None if question_valid is None else question_valid.repeat(repeat),
            )
        else:
            if len(encoded) != self.num_streams:
                encoded = encoded * self.num_streams
            prepared = [
                self._prepare_stream(
                    block,
                    visual,
                    image_index if self.num_streams == 1 else image_index[:, k],
                    drop_image,
                    condition,
                    image_valid,
                    question_valid,
                )
                for k, (block, visual) in enumerate(zip(self.fusion_blocks(), encoded, strict=True))
            ]

        with padding_rows(question_valid):
            text = self.text(input_ids, attention_mask)
        mask = attention_mask.bool()

        if drop_question is not None:
            text = torch.where(
                drop_question.view(-1, 1, 1), self.null_question.to(text.dtype), text
            )
            first_only = torch.arange(mask.shape[1], device=mask.device) == 0
            mask = torch.where(drop_question.unsqueeze(1), first_only, mask)
        if condition is not None and self.conditioning_inject == "question":
            # After the null question: a question without its text keeps its labels.
            text = film(text, condition)

        with padding_rows(question_valid):
            if stacked:
                fused = self.fusion.fuse_stacked(prepared, text, mask, question_valid)
            else:
                fused = self.fuse(prepared, text, mask, question_valid)
            logits = self.head(fused.features)
        return VQAOutput(logits=logits, attention=fused.attention)

    def _check_image_index(self, image_index: Tensor | None, batch_size: int) -> Tensor | None:
        """[B] for one stream (a one-stream [B, 1] squeezed), [B, K] for K streams."""
        if self.num_streams == 1:
            if image_index is not None and image_index.dim() == 2 and image_index.shape[1] == 1:
                return image_index[:, 0]
            if image_index is not None and image_index.dim() != 1:
                raise ValueError(
                    f"image_index must be [B] for a one-image model, got {tuple(image_index.shape)}"
                )
            return image_index
        expected = (batch_size, self.num_streams)
        if image_index is None or tuple(image_index.shape) != expected:
            got = None if image_index is None else tuple(image_index.shape)
            raise ValueError(
                f"a model with streams {self.streams} needs image_index [B, K] = {expected} "
                f"(column k: the row of each question's stream-k image), got {got}"
            )
        return image_index

    def _conditioning_vector(self, conditioning_ids: Tensor | None, like: Tensor) -> Tensor | None:
        """Each question's summed label embedding [B, width] (None without conditioning)."""
        if self.conditioning is None:
            if conditioning_ids is not None:
                raise ValueError(
                    "conditioning_ids given, but the model was built without conditioning "
                    "fields (VQAModel(conditioning=...))"
                )
            return None
        if conditioning_ids is None:
            conditioning_ids = self.conditioning.unknown_ids(like.shape[0], like.device)
        return self.conditioning(conditioning_ids)

    def _encode(
        self,
        images: Tensor | None,
        visual_features: Sequence[Tensor] | None,
        image_index: Tensor | None,
        image_valid: Tensor | None,
        question_valid: Tensor | None,
    ) -> list[list[Tensor]]:
        """The stage maps [U, C_s, H_s, W_s] of each encoder: one list from a shared encoder (or
        the cached features), which every stream reads, or one per stream from separate
        encoders."""
        if isinstance(self.visual, StreamEncoders):
            if images is None:
                raise ValueError(
                    "separate visual encoders (visual_streams=separate) read images, not "
                    "cached visual_features"
                )
            encoded = []
            for k in range(self.num_streams):
                # Encoder k's batch norms take their statistics over the images stream k reads.
                rows = self._stream_rows(
                    image_valid, image_index[:, k], None, question_valid, len(images)
                )
                with padding_rows(rows):
                    encoded.append(self.encode_image(images, stream=k))
        else:
            with padding_rows(image_valid):
                visual = (
                    self.encode_image(images) if visual_features is None else list(visual_features)
                )
            encoded = [visual]
        for visual in encoded:
            if [stage.shape[1] for stage in visual] != self.visual_channels:
                raise ValueError(
                    f"visual stages have {[stage.shape[1] for stage in visual]} channels, the "
                    f"model was built for {self.visual_channels}"
                )
        return encoded

    def _prepare_stream(
        self,
        block: FusionBlock,
        visual: list[Tensor],
        index: Tensor | None,
        drop_image: Tensor | None,
        condition: Tensor | None,
        image_valid: Tensor | None,
        question_valid: Tensor | None,
    ) -> list[Tensor]:
        """One stream's ``prepare_visual`` output per question: per distinct image first
        (``visual`` rows, the null image last under modality dropout), then repeated per
        question by ``index`` [B] (None: row b is question b's). With visual conditioning the
        maps are per question from the start: each question's own labels are added to them."""
        if drop_image is not None:
            null_row = len(visual[0]) - 1
            if index is None:
                index = torch.arange(null_row, device=drop_image.device)
            index = torch.where(drop_image, null_row, index)
        if condition is not None and self.conditioning_inject == "visual":
            if index is not None:
                visual = [stage.index_select(0, index) for stage in visual]
            visual, index, rows = add_to_maps(visual, condition), None, question_valid
        elif self.num_streams == 1:
            rows = self._prepare_rows(
                image_valid, index, drop_image, question_valid, len(visual[0])
            )
        else:
            rows = self._stream_rows(image_valid, index, drop_image, question_valid, len(visual[0]))
        with padding_rows(rows):
            prepared = block.prepare_visual(visual)
        if index is not None:
            prepared = [part.index_select(0, index) for part in prepared]
        return prepared

    def _with_null_image(self, visual: list[Tensor]) -> list[Tensor]:
        """The stage maps with the null image appended as their last row."""
        return [
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

    @staticmethod
    def _stream_rows(
        image_valid: Tensor | None,
        image_index: Tensor,
        drop_image: Tensor | None,
        question_valid: Tensor | None,
        rows: int,
    ) -> Tensor:
        """The rows one of several streams reads (``image_index`` [B], its column), as
        ``padding_rows`` weights: batch norms of that stream's encoder and ``prepare_visual``
        then take their statistics over that stream's images only, not over the other
        streams' images that share the batch.

        As :meth:`_prepare_rows`: with modality dropout each row weighs as many questions as
        read it; otherwise each image the stream reads counts once (and padding rows, of a
        static-shape batch, not at all).
        """
        weights = (
            torch.ones_like(image_index, dtype=torch.float32)
            if question_valid is None
            else question_valid.to(torch.float32)
        )
        readers = weights.new_zeros(rows).index_add_(0, image_index, weights)
        if drop_image is not None:
            return readers
        read = readers > 0
        return read if image_valid is None else read & image_valid
