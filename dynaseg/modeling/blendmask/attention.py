"""BlendMask's top layer: a 3×3 conv on the box tower giving K·M·M attention logits per location.

It is evaluated only at the locations that need it (positives in training, kept detections at
inference) by gathering each location's 3×3 neighbourhood and applying the conv as a matrix
product; the result equals the dense convolution at those locations exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["AttentionTopLayer"]


class AttentionTopLayer(nn.Module):
    """Args: in_channels: box-tower width F. num_bases: K. attention_size: M."""

    def __init__(self, *, in_channels: int, num_bases: int = 4, attention_size: int = 14) -> None:
        super().__init__()
        self.num_bases, self.attention_size = num_bases, attention_size
        self.conv = nn.Conv2d(in_channels, num_bases * attention_size**2, 3, padding=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward_dense(self, box_tower: list[Tensor]) -> list[Tensor]:
        """Every location: [(B, F, H_l, W_l)] → [(B, K·M·M, H_l, W_l)] (reference path)."""
        return [self.conv(x) for x in box_tower]

    def forward(self, box_tower: list[Tensor], image_index: Tensor, location_index: Tensor) -> Tensor:
        """Attention at N selected locations.

        Args:
            box_tower: per level (B, F, H_l, W_l).
            image_index: (N,) image of each location in the batch.
            location_index: (N,) index into the image's concatenated, row-major locations.
        Returns:
            (N, K, M, M) attention logits.
        """
        n, k, m = location_index.shape[0], self.num_bases, self.attention_size
        weight = self.conv.weight.flatten(1)                                        # (KMM, F·9)
        out = box_tower[0].new_empty((n, weight.shape[0]))
        offset = 0
        for feat in box_tower:
            h, w = feat.shape[-2:]
            in_level = (location_index >= offset) & (location_index < offset + h * w)
            if in_level.any():
                local = location_index[in_level] - offset
                ys, xs = local // w, local % w
                padded = F.pad(feat, (1, 1, 1, 1))
                dy = torch.arange(3, device=feat.device)
                rows = (ys[:, None] + dy)[:, :, None]                                  # (n, 3, 1)
                cols = (xs[:, None] + dy)[:, None, :]                                  # (n, 1, 3)
                patches = padded[image_index[in_level][:, None, None], :, rows, cols]  # (n, 3, 3, F)
                patches = patches.permute(0, 3, 1, 2).flatten(1)                       # (n, F·9)
                out[in_level] = F.linear(patches, weight, self.conv.bias).to(out.dtype)
            offset += h * w
        return out.view(n, k, m, m)
