"""Input normalisation shared by every meta-architecture."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalize_images"]


def normalize_images(
    images: Tensor, image_sizes: list[tuple[int, int]], pixel_mean: Tensor, pixel_std: Tensor
) -> Tensor:
    """(B, 3, Hp, Wp) RGB 0-255 → (x - mean) / std, with the padding set to 0 after normalisation.

    pixel_mean, pixel_std: (1, 3, 1, 1). Zero padding in normalised space is detectron2's convention.
    """
    x = (images - pixel_mean) / pixel_std
    valid = torch.zeros_like(x[:, :1])
    for i, (h, w) in enumerate(image_sizes):
        valid[i, :, :h, :w] = 1
    return x * valid
