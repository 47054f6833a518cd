"""Feature-map locations in image coordinates."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_locations", "flatten_levels"]


def compute_locations(
    sizes: list[tuple[int, int]], strides: list[int], device: torch.device, offset: float = 0.5
) -> list[Tensor]:
    """Cell (i, j) of a stride-s map sits at (x, y) = (j·s + offset·s, i·s + offset·s): the cell
    centre (FCOS, AdelaiDet) by default, its corner with ``offset=0`` (torchvision's FCOS anchors).

    Returns per level an (H_l·W_l, 2) float tensor of (x, y), row-major.
    """
    out = []
    for (h, w), s in zip(sizes, strides):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + offset * s
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + offset * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return out


def flatten_levels(per_level: list[Tensor]) -> Tensor:
    """[(B, C, H_l, W_l)] → (B, sum_l H_l·W_l, C), levels concatenated in order, row-major."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in per_level], dim=1)
