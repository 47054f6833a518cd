"""RoIAlign with our conventions fixed in one place (torchvision's op underneath)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["roi_align_aligned", "boxes_to_rois"]


def boxes_to_rois(boxes_per_image: list[Tensor]) -> Tensor:
    """Per image (R_i, 4) XYXY boxes → (ΣR_i, 5) rows ``[image index, x0, y0, x1, y1]``, the format
    torchvision's ``roi_align`` takes (sizes from tensor shapes, so a trace keeps them dynamic)."""
    index = [b.new_full((b.shape[0], 1), float(i)) for i, b in enumerate(boxes_per_image)]
    return torch.cat([torch.cat(index), torch.cat(boxes_per_image)], dim=1)


def roi_align_aligned(
    features: Tensor,
    rois: Tensor,
    *,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign with ``aligned=True`` (half-pixel offset, detectron2's ROIAlignV2) by default.

    torchvision's op defaults to ``aligned=False``; we pass True so a box [0, W] covers exactly
    the image. ``aligned=False`` reproduces torchvision's detection models (their
    ``MultiScaleRoIAlign``). features: (B, C, H, W); rois: (N, 5) → (N, C, output_size, output_size).
    """
    return roi_align(
        features,
        rois.to(features.dtype),
        output_size=output_size,
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
