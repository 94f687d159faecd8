"""ResNet visual encoder: a torchvision ResNet cut after its deepest requested stage.

Fusion blocks attend over grid cells, so the encoder returns feature maps of the chosen
stages instead of a pooled vector, by stage name (as torchvision's ``IntermediateLayerGetter``
does); everything past the deepest stage (and the classifier) is dropped so it neither runs nor
holds parameters.

What the rest of the code needs to know about an encoder without reaching into its modules
(stages, channels, a digest of its weights, whether it is frozen) is its
:meth:`ResNetEncoder.describe`: a :class:`VisualEncoderSpec`, plain data that the feature store
and the datamodule check a cache against.
"""

from __future__ import annotations

import hashlib
import os
import socket
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import WeightsEnum, get_model, get_model_weights
from torchvision.ops import FrozenBatchNorm2d

from vqa.models.norms import SafeBatchNorm2d

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STAGES = ("layer1", "layer2", "layer3", "layer4")
STEM = ("conv1", "bn1", "relu", "maxpool")
# Without a timeout urllib waits forever on a firewall that drops packets silently.
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class VisualEncoderSpec:
    """What a visual encoder computes, as plain data (:meth:`ResNetEncoder.describe`).

    ``stages`` are the returned stages in network order, ``channels`` their widths.
    ``digests[i]`` is a digest of every weight the map of ``stages[i]`` depends on (the stem and
    the stages up to and including it), so a reader of layer3 alone can be checked against maps
    written by an encoder that went on to layer4. ``trainable`` names the parameters that still
    receive gradients (empty: fully frozen, a fixed feature function).
    """

    arch: str
    stages: tuple[str, ...]
    channels: tuple[int, ...]
    digests: tuple[str, ...]
    trainable: tuple[str, ...] = field(default=(), repr=False)

    @property
    def frozen(self) -> bool:
        return not self.trainable

    @property
    def weights_digest(self) -> str:
        """Digest of all the encoder's weights (its deepest stage depends on every one)."""
        return self.digests[-1]

    def stage_channels(self) -> dict[str, int]:
        return dict(zip(self.stages, self.channels, strict=True))

    def stage_digests(self) -> dict[str, str]:
        return dict(zip(self.stages, self.digests, strict=True))


class ResNetEncoder(nn.Module):
    """Images [B, 3, H, W] -> ordered {stage name: feature map [B, C_s, H_s, W_s]} for each
    configured stage, in network order.

    ``freeze`` is ``"none"``, ``"all"``, ``"stem"`` or a stage name (the stem and every stage
    up to and including it). Frozen parts never receive gradients and stay in eval mode, so a
    fully frozen encoder is a deterministic feature extractor. ``bn="frozen"`` swaps every
    BatchNorm for torchvision's ``FrozenBatchNorm2d`` (fixed statistics and affine, the usual
    choice when fine-tuning with small per-GPU batches). ``init_seed`` draws random weights from
    their own generator instead of the run's, so a frozen random encoder is one fixed feature
    function whatever the run seed, and runs with different seeds share one feature cache.
    """

    def __init__(
        self,
        arch: str = "resnet101",
        weights: str | None = None,
        stages: Sequence[str] = ("layer4",),
        freeze: str = "none",
        bn: str = "train",
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r} is not one of {ARCHS}")
        if bn not in ("frozen", "train"):
            raise ValueError(f"bn={bn!r} must be 'frozen' or 'train'")
        if bn == "frozen" and weights is None:
            warnings.warn(
                "bn='frozen' with random weights: BatchNorm stays the identity, so activations "
                "are never normalised; use bn='train' when training from scratch",
                stacklevel=2,
            )
        self.arch = arch
        self.stage_names = _ordered_stages(stages)
        built = (*STEM, *STAGES[: STAGES.index(self.stage_names[-1]) + 1])

        norm_layer = FrozenBatchNorm2d if bn == "frozen" else SafeBatchNorm2d
        with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            network = _build_resnet(arch, weights, norm_layer)
        self.body = nn.ModuleDict({name: getattr(network, name) for name in built})
        # The widths in stage order: what a model sizes its fusion block from.
        self.out_channels = [_stage_width(self.body[name]) for name in self.stage_names]

        self._frozen = _frozen_names(freeze, built)
        for name in self._frozen:
            self.body[name].requires_grad_(False)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.gradient_checkpointing = gradient_checkpointing
        self.train()

    def train(self, mode: bool = True) -> ResNetEncoder:
        """Switch mode, but keep frozen parts (and frozen BN) in eval whatever ``mode`` is."""
        super().train(mode)
        for name in self._frozen:
            self.body[name].eval()
        for module in self.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eval()
        return self

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        features: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.body.items():
            if self._checkpointed(name):
                x = checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
            if name in self.stage_names:
                features[name] = x
        return features

    # ------------------------------------------------------------------ self-description

    def stage_channels(self) -> dict[str, int]:
        """Channels of each returned stage, in network order."""
        return dict(zip(self.stage_names, self.out_channels, strict=True))

    def stage_shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]:
        """The [C, H, W] map of each returned stage for a square ``image_size`` input (one
        forward of a blank image in eval mode: batch-norm statistics stay as they are)."""
        device = next(self.parameters()).device
        training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                maps = self(torch.zeros(1, 3, image_size, image_size, device=device))
        finally:
            self.train(training)
        return {name: tuple(m.shape[1:]) for name, m in maps.items()}

    def stage_digests(self) -> dict[str, str]:
        """Per built stage, a digest of the weights its output depends on: the stem's and those
        of every stage up to and including it, in network order.

        BatchNorm's ``num_batches_tracked`` is left out: an eval-mode forward never reads it and
        FrozenBatchNorm2d has none, so ``bn=train`` and ``bn=frozen`` with the same weights agree.
        Memory layout is not part of it either (``channels_last`` computes the same maps).
        """
        digest = hashlib.blake2b(digest_size=16)
        digests = {}
        for name, module in self.body.items():
            for key, tensor in module.state_dict().items():
                if key.endswith("num_batches_tracked"):
                    continue
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{name}.{key}:{flat.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(flat.view(torch.uint8).numpy().data)
            if name in STAGES:
                digests[name] = digest.copy().hexdigest()
        return digests

    @property
    def frozen(self) -> bool:
        """Whether no parameter receives gradients: a fixed feature function."""
        return not any(p.requires_grad for p in self.parameters())

    def describe(self) -> VisualEncoderSpec:
        """Stages, channels, weight digests and trainable parameters, as plain data."""
        digests = self.stage_digests()
        return VisualEncoderSpec(
            arch=self.arch,
            stages=tuple(self.stage_names),
            channels=tuple(self.out_channels),
            digests=tuple(digests[name] for name in self.stage_names),
            trainable=tuple(n for n, p in self.named_parameters() if p.requires_grad),
        )

    def _checkpointed(self, name: str) -> bool:
        # Only trainable stages keep activations worth recomputing.
        return (
            self.gradient_checkpointing
            and self.training
            and torch.is_grad_enabled()
            and name in STAGES
            and name not in self._frozen
        )


def _ordered_stages(stages: Sequence[str]) -> list[str]:
    """Validate the requested stages and return them in network order."""
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown or len(set(stages)) != len(stages):
        raise ValueError(f"stages={stages} must be distinct names from {STAGES}")
    return sorted(stages, key=STAGES.index)


def _frozen_names(freeze: str, built: Sequence[str]) -> list[str]:
    """Names of the body modules that ``freeze`` covers."""
    if freeze == "none":
        return []
    if freeze == "all":
        return list(built)
    if freeze == "stem":
        return list(STEM)
    if freeze not in built or freeze in STEM:
        raise ValueError(
            f"freeze={freeze!r} must be 'none', 'all', 'stem' or one of the built stages "
            f"{[b for b in built if b in STAGES]}"
        )
    return list(built[: built.index(freeze) + 1])


def _stage_width(stage: nn.Sequential) -> int:
    # The last block of a stage maps C -> C (identity shortcut), so its input width is the
    # stage's output width for both BasicBlock and Bottleneck.
    return stage[-1].conv1.in_channels


def _build_resnet(arch: str, weights: str | None, norm_layer: type[nn.Module]) -> nn.Module:
    """torchvision ResNet with ``weights`` (enum member name, or None for random init)."""
    if weights is None:
        return get_model(arch, weights=None, norm_layer=norm_layer)
    enum = get_model_weights(arch)
    try:
        member: WeightsEnum = enum.verify(weights)
    except KeyError as err:
        raise ValueError(
            f"weights={weights!r} is not a {enum.__name__} member; choose from "
            f"{list(enum.__members__)} or null for random init"
        ) from err
    cache_file = os.path.join(
        torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(member.url).path)
    )
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
            return get_model(arch, weights=member, norm_layer=norm_layer)
    except OSError as err:  # URLError, DNS failure, timeout, unwritable cache
        raise OSError(
            f"Could not load {enum.__name__}.{member.name}: it is not in the torch hub cache and "
            f"downloading {member.url} failed ({err}). On a machine with network, download that "
            f"file to {cache_file} (or set TORCH_HOME to a directory holding "
            f"checkpoints/{os.path.basename(cache_file)}), or set weights: null for random init."
        ) from err


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
