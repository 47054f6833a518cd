"""Multi-level RoIAlign over an FPN (FPN paper, Eq. 1), aligned as everywhere in dynaseg."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dynaseg.layers.roi_align import roi_align_aligned

__all__ = ["assign_levels", "multilevel_roi_align"]


def assign_levels(
    rois: Tensor,
    *,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
    min_level: int = 2,
    max_level: int = 5,
) -> Tensor:
    """FPN level of each RoI: k = ⌊k0 + log2(√(wh) / 224)⌋ clamped to [min_level, max_level].

    rois: (N, 5) [b, x0, y0, x1, y1] input pixels → (N,) int64 levels. A tiny epsilon keeps exact
    powers of two (e.g. √(wh) = 112) on their level despite float rounding.
    """
    wh = (rois[:, 3] - rois[:, 1]).clamp(min=0) * (rois[:, 4] - rois[:, 2]).clamp(min=0)
    level = torch.floor(canonical_level + torch.log2(wh.sqrt() / canonical_box_size + 1e-8) + 1e-6)
    return level.clamp(min_level, max_level).to(torch.int64)


def multilevel_roi_align(
    features: dict[str, Tensor],
    rois: Tensor,
    *,
    output_size: int,
    sampling_ratio: int = 0,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
    min_level: int = 2,
    max_level: int = 5,
    aligned: bool = True,
) -> Tensor:
    """Pool each RoI from the FPN level its size selects (RoIAlign at scale 1/2^k on ``p{k}``;
    ``aligned=False``: torchvision's ``MultiScaleRoIAlign``).

    features: {"p2": (B, C, H/4, W/4), ..., "p5": (B, C, H/32, W/32)} (others ignored);
    rois: (N, 5) [b, x0, y0, x1, y1] input pixels → (N, C, S, S), S = output_size, in RoI order.
    """
    levels = assign_levels(
        rois,
        canonical_box_size=canonical_box_size,
        canonical_level=canonical_level,
        min_level=min_level,
        max_level=max_level,
    )
    first = features[f"p{min_level}"]
    out = first.new_zeros((rois.shape[0], first.shape[1], output_size, output_size))
    for k in range(min_level, max_level + 1):
        index = (levels == k).nonzero().squeeze(1)  # maybe empty: no Python branch (traceable)
        pooled = roi_align_aligned(
            features[f"p{k}"],
            rois[index],
            output_size=output_size,
            spatial_scale=math.ldexp(1.0, -k),
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
        out = out.index_put((index,), pooled.to(out.dtype))
    return out
