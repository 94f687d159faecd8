"""Late fusion: pool each modality on its own, then concatenate (the weakest baseline).

No cross-modal interaction happens before the answer head, which is the point: it measures
what the encoders alone give. Mean pooling discards where things are, so this block takes no
positional or spatial options; its attention maps are its actual pooling weights (uniform over
grid cells and over real words), so they satisfy the contract honestly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa.models.fusion.base import FusionBlock, FusionOutput, masked_mean


class LateFusion(FusionBlock):
    """Mean grid cell and mean real word, each projected to ``hidden_dim``, concatenated."""

    def __init__(self, visual_channels: list[int], text_dim: int, hidden_dim: int = 512) -> None:
        super().__init__(visual_channels, text_dim)
        self.image_proj = nn.Linear(self.visual_channels[-1], hidden_dim)
        self.text_proj = nn.Linear(self.text_dim, hidden_dim)
        self.out_dim = 2 * hidden_dim

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> FusionOutput:
        feature_map = visual[-1]
        batch, _, height, width = feature_map.shape
        mask = text_mask.bool()
        # Zeroing padding keeps junk (even inf/nan) out of the pooled sum.
        text = text.masked_fill(~mask.unsqueeze(-1), 0.0)
        # Pool before projecting: the projection is linear, so this is the same and cheaper.
        image = F.gelu(self.image_proj(feature_map.mean(dim=(2, 3))))
        question = F.gelu(self.text_proj(masked_mean(text, mask)))
        real = mask.to(image.dtype)
        attention = {
            "image": torch.full(
                (batch, height, width),
                1.0 / (height * width),
                dtype=image.dtype,
                device=image.device,
            ),
            "question": real / real.sum(dim=1, keepdim=True).clamp_min(1.0),
        }
        return FusionOutput(features=torch.cat([image, question], dim=-1), attention=attention)
