"""Image decoding to RGB and the torchvision transforms applied to every sample."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from vqa.data.errors import DataError

# The torchvision ResNet weights were trained with these statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, CMYK, P, RGBA, ...) to a decoded RGB image.

    EXIF orientation is deliberately ignored: COCO annotations and questions refer to the
    stored pixel grid, so rotating the image would contradict "left of" questions.
    """
    if image.mode == "P" and "transparency" in image.info:
        # Going through RGBA keeps PIL from warning about palette transparency.
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb(
    source: str | Path | bytes, question_id: int | None = None, name: str | None = None
) -> Image.Image:
    """Open and fully decode an image (a file, or encoded bytes from a hub table) as RGB.

    The content decides the decoder, so PNG bytes in a ``.jpg`` decode fine; a missing,
    unreadable or truncated image raises a :class:`DataError` naming the file (``name`` for
    bytes) and the question.
    """
    path = name if isinstance(source, bytes) else source
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return to_rgb(image)  # convert() forces a full decode, which is what exposes truncation
    except FileNotFoundError as err:
        raise DataError(
            "image file not found",
            file=path,
            question_id=question_id,
            field="image_path",
            reason="missing_image",
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"cannot decode image ({err}); run `python -m vqa.data.check ROOT` to list every "
            "unreadable image",
            file=path,
            question_id=question_id,
            field="image_path",
            reason="corrupt_image",
        ) from err


def build_transform(image_size: int, augment: bool = False) -> v2.Compose:
    """Resize to a square, optionally augment, convert to a normalised float tensor [3, H, W].

    The whole image is resized rather than cropped, so no object a question counts is cut
    away. Augmentation is limited to what keeps every answer true: no horizontal flip (left/
    right questions), no hue or saturation change (colour questions), no rotation; only shifts
    of at most 5%, slight zoom-outs, and brightness/contrast jitter.
    """
    ops: list[v2.Transform] = [v2.Resize((image_size, image_size), antialias=True)]
    if augment:
        ops += [
            v2.RandomAffine(degrees=0.0, translate=(0.05, 0.05), scale=(0.9, 1.0)),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    ops += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ]
    return v2.Compose(ops)


# Ops whose output depends on their input alone: they draw no random numbers.
DETERMINISTIC_OPS = (v2.Resize, v2.PILToTensor, v2.ToDtype, v2.Normalize)

Step = Callable[[Any], Any]


def split_deterministic(transform: Step) -> tuple[Step | None, Step | None]:
    """``transform`` as ``(head, tail)`` with ``tail(head(image)) == transform(image)`` bit for
    bit (``None``: an empty part).

    ``head`` is the run of leading ops that draw no random numbers, so its result can be
    computed once per image and shared by the image's questions. ``tail`` starts at the first
    other op and must run once per question, so that each call draws the random numbers it
    always drew. An op not known to be deterministic counts as random: at worst it is run
    more often than needed.
    """
    ops = list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    cut = 0
    while cut < len(ops) and isinstance(ops[cut], DETERMINISTIC_OPS):
        cut += 1
    head = v2.Compose(ops[:cut]) if cut else None
    tail = v2.Compose(ops[cut:]) if cut < len(ops) else None
    return head, tail
