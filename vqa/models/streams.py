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
from torch import nn

from vqa.models.fusion.base import FusionBlock, FusionOutput
from vqa.models.visual import VisualEncoderSpec

VISUAL_STREAMS = ("shared", "separate")
STREAM_FUSIONS = ("separate", "shared")
ATTENTION_KINDS = ("image", "question")


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


class StreamFusion(nn.Module):
    """The fusion of each stream (``stream_blocks()[k]`` reads stream k) and the combiner of
    their ``features``: the model's ``fusion`` when it has several streams.

    ``blocks`` holds one block per stream, or one block that every stream runs
    (``model.stream_fusion=shared``, as Siamese networks share their towers): each stream still
    gets its own co-attention maps, and the block learns to read an image from every stream's
    questions at once. ``out_dim`` is the combiner's, what the answer head is sized from.
    """

    def __init__(
        self, blocks: Sequence[FusionBlock], combiner: nn.Module, streams: Sequence[str]
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

    def stream_blocks(self) -> list[FusionBlock]:
        """The block of each stream, in stream order (the same one K times when shared)."""
        if len(self.blocks) == 1:
            return [self.blocks[0]] * len(self.streams)
        return list(self.blocks)

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
