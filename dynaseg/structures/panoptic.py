"""Panoptic segmentation of one image, and the COCO panoptic PNG id encoding.

COCO panoptic PNGs store a segment id per pixel as RGB: id = R + 256·G + 256²·B, 0 = void.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dynaseg.structures.instances import Instances

__all__ = ["IGNORE_LABEL", "Segment", "PanopticSegmentation", "rgb_to_id", "id_to_rgb"]

IGNORE_LABEL = 255  # semantic-map value for pixels that carry no stuff label (void, crowd, things)


@dataclass(frozen=True, kw_only=True)
class Segment:
    """One segment of a panoptic map.

    Attributes:
        id: value of its pixels in ``PanopticSegmentation.ids`` (≥ 1).
        label: contiguous class id among the things (isthing) or among the stuff classes.
        isthing: thing (countable instance) or stuff.
        score: detection score of a thing; 1.0 for stuff.
        area: number of pixels.
    """

    id: int
    label: int
    isthing: bool
    score: float
    area: int


@dataclass(kw_only=True)
class PanopticSegmentation:
    """A panoptic prediction at the image's original size.

    Attributes:
        ids: (H, W) int32 segment id per pixel, 0 = void (no segment).
        segments: one entry per id present in ``ids`` (sorted by id).
        instances: the thing detections (with full-image masks) the thing segments came from, for
            mask AP; None when not available.
    """

    ids: Tensor
    segments: list[Segment]
    instances: Instances | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.ids.shape[0]), int(self.ids.shape[1])


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 COCO panoptic PNG → (H, W) int64 segment ids."""
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray | Tensor) -> np.ndarray:
    """(H, W) integer segment ids (< 256³) → (H, W, 3) uint8 COCO panoptic PNG."""
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError("segment ids must be in [0, 256³)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
