"""RoIAlign with our conventions fixed in one place (torchvision's op underneath)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["roi_align_aligned", "boxes_with_batch_index"]


def boxes_with_batch_index(boxes: Tensor, batch_index: Tensor) -> Tensor:
    """(N, 4) XYXY + (N,) image index → (N, 5) rows ``[b, x0, y0, x1, y1]`` as torchvision expects."""
    return torch.cat([batch_index[:, None].to(boxes.dtype), boxes], dim=1)


def roi_align_aligned(
    features: Tensor, rois: Tensor, *, output_size: int, spatial_scale: float, sampling_ratio: int
) -> Tensor:
    """RoIAlign with ``aligned=True`` (half-pixel offset, detectron2's ROIAlignV2).

    torchvision defaults to ``aligned=False``; we always pass True so a box [0, W] covers exactly
    the image. features: (B, C, H, W); rois: (N, 5) → (N, C, output_size, output_size).
    """
    return roi_align(
        features,
        rois.to(features.dtype),
        output_size=output_size,
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=True,
    )
