"""Auxiliary thing-semantic supervision of the basis features, built on the fly from instance masks."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dynaseg.layers.conv_norm import conv_norm_relu

__all__ = ["SemanticHead", "semantic_targets", "semantic_loss", "IGNORE_INDEX"]

IGNORE_INDEX = 255


class SemanticHead(nn.Module):
    """2 × [3×3 conv, norm, ReLU] + 1×1 conv → C + 1 logits (channel 0 = background) on P3."""

    def __init__(
        self, *, in_channels: int, channels: int, num_classes: int, norm: str = "BN"
    ) -> None:
        super().__init__()
        self.tower = nn.Sequential(
            conv_norm_relu(in_channels, channels, norm), conv_norm_relu(channels, channels, norm)
        )
        self.predictor = nn.Conv2d(channels, num_classes + 1, 1)

    def forward(self, p3: Tensor) -> Tensor:
        """p3: (B, F, H/8, W/8) → (B, C + 1, H/8, W/8)."""
        return self.predictor(self.tower(p3))


@torch.no_grad()
def semantic_targets(
    masks_per_image: list[Tensor],
    labels_per_image: list[Tensor],
    padded_size: tuple[int, int],
    stride: int,
) -> Tensor:
    """Thing-semantic labels sampled at the centres of stride-``stride`` cells.

    Instances are painted in order (later ones on top) with ``label + 1``; 0 is background and
    the padding is ``IGNORE_INDEX``.
    masks_per_image: [(M_i, h_i, w_i) bool]; labels_per_image: [(M_i,)] → (B, Hp/stride, Wp/stride) int64.
    """
    hp, wp = padded_size
    out = []
    for masks, labels in zip(masks_per_image, labels_per_image):
        sem = torch.full((hp, wp), IGNORE_INDEX, dtype=torch.int64, device=labels.device)
        h, w = masks.shape[-2:]
        order = torch.arange(1, masks.shape[0] + 1, device=labels.device)[:, None, None]
        top = (
            (masks * order).amax(dim=0)
            if masks.shape[0]
            else torch.zeros((h, w), dtype=torch.int64, device=labels.device)
        )
        class_of = torch.cat([labels.new_zeros(1), labels + 1])  # index 0 → background
        sem[:h, :w] = class_of[top]
        out.append(sem[stride // 2 :: stride, stride // 2 :: stride])
    return torch.stack(out)


def semantic_loss(logits: Tensor, targets: Tensor, weight: float) -> Tensor:
    """weight · softmax cross-entropy, mean over non-ignored pixels. logits: (B, C+1, h, w); targets: (B, h, w)."""
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return weight * F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
