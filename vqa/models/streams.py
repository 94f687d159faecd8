"""Visual streams: several named images per question (a left and a right image, two cameras).

``VQAModel`` gives each stream its own fusion block and combines their outputs
(:class:`StreamFusion`); the images go through one shared visual encoder, or one encoder per
stream (:class:`StreamEncoders`, ``model.visual_streams=separate``). With one stream nothing of
this is built: the model is the single-image one.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vqa.models.fusion.base import FusionBlock, FusionOutput
from vqa.models.norms import padding_rows
from vqa.models.visual import VisualEncoderSpec

VISUAL_STREAMS = ("shared", "separate")
STREAM_FUSIONS = ("separate", "shared")
ATTENTION_KINDS = ("image", "question")
# Same scale as BERT's token and segment embeddings, to which a stream embedding is added.
STREAM_EMBEDDING_INIT_STD = 0.02


class StreamEncoders(nn.ModuleList):
    """One visual encoder per stream, each starting as a copy of ``encoder`` (the configured
    one: pretrained weights stay pretrained, and the copies draw nothing from the random
    generator). Encoder k only ever sees stream k's images, so stream k's features depend on
    it alone.

    Mirrors the single encoder's interface where it can: ``out_channels`` (all alike) and
    :meth:`describe`.
    """

    def __init__(self, encoder: nn.Module, num_streams: int) -> None:
        super().__init__([encoder, *(copy.deepcopy(encoder) for _ in range(num_streams - 1))])
        self.out_channels = list(encoder.out_channels)

    def describe(self) -> VisualEncoderSpec:
        """The encoders described together: their architecture, stages and channels, digests
        over every encoder's weights (no store of one encoder's maps matches them:
        ``data.features=cached`` cannot serve separate encoders) and every trainable
        parameter, named ``<stream index>.<name>``."""
        specs = [encoder.describe() for encoder in self]
        digests = tuple(
            hashlib.blake2b(
                "".join(spec.digests[stage] for spec in specs).encode(), digest_size=16
            ).hexdigest()
            for stage in range(len(specs[0].stages))
        )
        return VisualEncoderSpec(
            arch=specs[0].arch,
            stages=specs[0].stages,
            channels=specs[0].channels,
            digests=digests,
            trainable=tuple(
                f"{k}.{name}" for k, spec in enumerate(specs) for name in spec.trainable
            ),
        )


class StreamEmbedding(nn.Module):
    """The question tokens [B, N, D] as stream k's block reads them: plus the stream's learned
    embedding, then plus a two-layer MLP of that, token by token.

    The embedding alone tells a block which stream it reads, but only additively, and whether a
    question concerns the image a block reads is an exclusive or: "the circle in the right
    image" is about the image of the right stream and not about the left one. A block that
    reads the question linearly (film's question term, a projection scoring cells) cannot
    compute that from a sum; the MLP's hidden units can ("right" and stream 2, "left" and
    stream 1). Its last layer starts at zero, so the tokens start as they are, plus the
    embedding.
    """

    def __init__(self, num_streams: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_streams, dim)
        nn.init.normal_(self.embedding.weight, std=STREAM_EMBEDDING_INIT_STD)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, text: Tensor, stream: int) -> Tensor:
        tagged = text + self.embedding.weight[stream].to(text.dtype)
        return tagged + self.mlp(tagged)


class StreamFusion(nn.Module):
    """The fusion of each stream (``stream_blocks()[k]`` reads stream k) and the combiner of
    their ``features``: the model's ``fusion`` when it has several streams.

    ``blocks`` holds one block per stream, or one block that every stream runs
    (``model.stream_fusion=shared``, as Siamese networks share their towers): each stream still
    gets its own co-attention maps, and the block learns to read an image from every stream's
    questions at once. A shared block runs once over the questions of every stream stacked
    (stream-major, ``K * B`` rows), so its batch norms take their statistics over all streams.

    ``text_dim`` (the question tokens' width) adds a learned embedding per stream to the tokens
    that stream's block reads, as BERT adds a segment embedding: a shared block otherwise gets
    the same question from every stream and cannot tell "the circle in the right image" about
    the image it reads from the one it does not. (A constant per call would be no use: a block
    that batch-normalises the pooled question subtracts it; stacked, the streams share those
    statistics and the difference stays.) ``out_dim`` is the combiner's, what the answer head
    is sized from.
    """

    def __init__(
        self,
        blocks: Sequence[FusionBlock],
        combiner: nn.Module,
        streams: Sequence[str],
        text_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) not in (1, len(streams)):
            raise ValueError(
                f"{len(blocks)} fusion blocks for {len(streams)} streams (one per stream, or "
                "one shared)"
            )
        self.blocks = nn.ModuleList(blocks)
        self.combiner = combiner
        self.streams = list(streams)
        self.out_dim = int(combiner.out_dim)
        self.stream_embedding: StreamEmbedding | None = None
        if text_dim is not None:
            self.stream_embedding = StreamEmbedding(len(self.streams), text_dim)

    @property
    def shared(self) -> bool:
        """One block that every stream runs."""
        return len(self.blocks) == 1

    def stream_blocks(self) -> list[FusionBlock]:
        """The block of each stream, in stream order (the same one K times when shared)."""
        if self.shared:
            return [self.blocks[0]] * len(self.streams)
        return list(self.blocks)

    def stream_text(self, text: Tensor, stream: int) -> Tensor:
        """The question tokens [B, N, D] that stream ``stream``'s block reads: through the
        :class:`StreamEmbedding`, where the model has one."""
        if self.stream_embedding is None:
            return text
        return self.stream_embedding(text, stream)

    def forward(
        self,
        prepared: Sequence[Sequence[Tensor]],
        text: Tensor,
        text_mask: Tensor,
        question_valid: Tensor | None = None,
    ) -> FusionOutput:
        """Each stream's per-question ``prepare_visual`` output (``prepared[k]``, [B, ...]
        parts) fused with the question and combined: features [B, out_dim] and every stream's
        attention maps. ``question_valid`` [B]: the real questions of a static-shape batch."""
        if self.shared:
            stacked = [torch.cat(parts) for parts in zip(*prepared, strict=True)]
            return self.fuse_stacked(stacked, text, text_mask, question_valid)
        outputs = [
            block.fuse(parts, self.stream_text(text, k), text_mask)
            for k, (block, parts) in enumerate(zip(self.blocks, prepared, strict=True))
        ]
        return self.combine(outputs)

    def fuse_stacked(
        self,
        prepared: Sequence[Tensor],
        text: Tensor,
        text_mask: Tensor,
        question_valid: Tensor | None = None,
    ) -> FusionOutput:
        """The shared block once over every stream's questions: ``prepared`` parts are
        [K * B, ...], stream-major (rows k*B .. k*B + B - 1: stream k's), the question [B, ...]
        as for :meth:`forward`."""
        if not self.shared:
            raise ValueError("fuse_stacked runs a shared block (model.stream_fusion=shared)")
        num = len(self.streams)
        texts = torch.cat([self.stream_text(text, k) for k in range(num)])
        rows = None if question_valid is None else question_valid.repeat(num)
        with padding_rows(rows):
            out = self.blocks[0].fuse(list(prepared), texts, text_mask.repeat(num, 1))
        attention = {key: att.chunk(num) for key, att in out.attention.items()}
        outputs = [
            FusionOutput(
                features=features, attention={key: att[k] for key, att in attention.items()}
            )
            for k, features in enumerate(out.features.chunk(num))
        ]
        return self.combine(outputs)

    def combine(self, outputs: Sequence[FusionOutput]) -> FusionOutput:
        """The streams' outputs (in stream order) -> the combined features [B, out_dim] and
        every stream's attention maps, keyed by :func:`stream_key`."""
        features = torch.stack([out.features for out in outputs], dim=1)
        attention = {
            stream_key(key, stream): att
            for stream, out in zip(self.streams, outputs, strict=True)
            for key, att in out.attention.items()
        }
        return FusionOutput(features=self.combiner(features), attention=attention)


def stream_key(key: str, stream: str) -> str:
    """A fusion block's attention key for ``stream``: ``image`` -> ``image/<stream>``,
    ``question/word`` -> ``question/<stream>/word``; it still starts with its kind."""
    kind = next((k for k in ATTENTION_KINDS if key.startswith(k)), None)
    if kind is None:
        raise ValueError(f"attention key {key!r} is neither image* nor question*")
    return f"{kind}/{stream}{key[len(kind) :]}"


def check_streams(streams: Sequence[str] | None, visual_streams: str) -> list[str] | None:
    """``streams`` as a list of distinct names (None: the single-image model)."""
    if visual_streams not in VISUAL_STREAMS:
        raise ValueError(f"visual_streams={visual_streams!r} must be one of {VISUAL_STREAMS}")
    if streams is None:
        return None
    names = [str(name) for name in streams]
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"streams={names} must be distinct, non-empty names (at least one)")
    return names
