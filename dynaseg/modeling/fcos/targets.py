"""FCOS target assignment: centre sampling, size ranges, smallest-area tie break."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["FCOSTargets", "assign_fcos_targets", "level_size_ranges", "centerness_target"]


class FCOSTargets(NamedTuple):
    """Targets for the R locations of one image (all levels concatenated)."""

    labels: Tensor  # (R,) int64, num_classes = background
    box_ltrb: Tensor  # (R, 4) float32, distances to the matched GT box sides / stride
    gt_inds: Tensor  # (R,) int64, index of the matched GT in this image, -1 for background


def level_size_ranges(sizes_of_interest: tuple[int, ...]) -> list[tuple[float, float]]:
    """(64, 128, 256, 512) → [(-1, 64), (64, 128), (128, 256), (256, 512), (512, inf)], both ends inclusive."""
    bounds = [-1.0, *map(float, sizes_of_interest), float("inf")]
    return list(zip(bounds[:-1], bounds[1:]))


def centerness_target(box_ltrb: Tensor) -> Tensor:
    """sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b)) for (P, 4) targets → (P,)."""
    lr = box_ltrb[:, [0, 2]]
    tb = box_ltrb[:, [1, 3]]
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-12)) * (
        tb.min(1).values / tb.max(1).values.clamp(min=1e-12)
    )
    return ratio.clamp(min=0).sqrt()


@torch.no_grad()
def assign_fcos_targets(
    *,
    locations: Tensor,
    strides: Tensor,
    size_ranges: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    center_sampling_radius: float,
) -> FCOSTargets:
    """Assign each location to at most one ground-truth box.

    Naming: R = locations (all levels), M = ground-truth boxes.

    Args:
        locations: (R, 2) (x, y) image coordinates.
        strides: (R,) stride of each location's level.
        size_ranges: (R, 2) inclusive [lo, hi] for max(l, t, r, b) at each location's level.
        gt_boxes: (M, 4) XYXY pixels. gt_labels: (M,) contiguous class ids.
        center_sampling_radius: positives must lie within radius·stride of the box centre
            (the sub-box is clipped to the GT box); 0 uses the whole box.
    """
    num_loc = locations.shape[0]
    if gt_boxes.shape[0] == 0:
        return FCOSTargets(
            labels=torch.full((num_loc,), num_classes, dtype=torch.int64, device=locations.device),
            box_ltrb=torch.zeros(num_loc, 4, device=locations.device),
            gt_inds=torch.full((num_loc,), -1, dtype=torch.int64, device=locations.device),
        )
    x, y = locations[:, 0:1], locations[:, 1:2]  # (R, 1)
    x0, y0, x1, y1 = gt_boxes.T.unsqueeze(-1).unbind(0)  # (M, 1) each
    ltrb = torch.stack([x - x0.T, y - y0.T, x1.T - x, y1.T - y], dim=2)  # (R, M, 4) pixels
    if center_sampling_radius > 0:
        cx, cy = (x0 + x1).T / 2, (y0 + y1).T / 2  # (1, M)
        r = strides[:, None] * center_sampling_radius  # (R, 1)
        sub = torch.stack(
            [
                torch.maximum(cx - r, x0.T),
                torch.maximum(cy - r, y0.T),
                torch.minimum(cx + r, x1.T),
                torch.minimum(cy + r, y1.T),
            ],
            dim=2,
        )  # (R, M, 4)
        inside = (
            torch.stack([x - sub[..., 0], y - sub[..., 1], sub[..., 2] - x, sub[..., 3] - y], dim=2)
            .min(dim=2)
            .values
            > 0
        )
    else:
        inside = ltrb.min(dim=2).values > 0
    max_side = ltrb.max(dim=2).values  # (R, M)
    in_range = (max_side >= size_ranges[:, 0:1]) & (max_side <= size_ranges[:, 1:2])
    areas = ((x1 - x0) * (y1 - y0)).T.expand(num_loc, -1)  # (R, M)
    areas = torch.where(inside & in_range, areas, torch.full_like(areas, float("inf")))
    min_area, gt_inds = areas.min(dim=1)  # (R,)
    positive = torch.isfinite(min_area)
    labels = torch.where(positive, gt_labels[gt_inds], torch.full_like(gt_inds, num_classes))
    box_ltrb = ltrb[torch.arange(num_loc, device=locations.device), gt_inds] / strides[:, None]
    return FCOSTargets(
        labels=labels,
        box_ltrb=box_ltrb,
        gt_inds=torch.where(positive, gt_inds, torch.full_like(gt_inds, -1)),
    )
