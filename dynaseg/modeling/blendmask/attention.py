"""BlendMask's top layer: a 3×3 conv on the box tower giving K·M·M attention logits per location.

It is evaluated only at the locations that need it (positives in training, kept detections at
inference) with ``conv3x3_at_locations``: exactly the dense convolution at those locations.
"""

from __future__ import annotations

from torch import Tensor, nn

from dynaseg.layers.sparse_conv import conv3x3_at_locations

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

    def forward(
        self, box_tower: list[Tensor], image_index: Tensor, location_index: Tensor
    ) -> Tensor:
        """Attention at N selected locations.

        Args:
            box_tower: per level (B, F, H_l, W_l).
            image_index: (N,) image of each location in the batch.
            location_index: (N,) index into the image's concatenated, row-major locations.
        Returns:
            (N, K, M, M) attention logits.
        """
        n, k, m = location_index.shape[0], self.num_bases, self.attention_size
        return conv3x3_at_locations(
            box_tower, self.conv.weight, self.conv.bias, image_index, location_index
        ).view(n, k, m, m)
