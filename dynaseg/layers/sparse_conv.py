"""A 3×3 convolution evaluated only at selected locations of a feature pyramid.

Top layers (BlendMask's attention, DR1Mask's instance embedding) are only needed at positives in
training and at kept detections in inference: a handful of locations among tens of thousands.
Gathering each location's 3×3 neighbourhood and applying the weights as one matrix product gives
exactly the dense convolution's output there.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["conv3x3_at_locations"]


def conv3x3_at_locations(
    features: list[Tensor],
    weight: Tensor,
    bias: Tensor | None,
    image_index: Tensor,
    location_index: Tensor,
) -> Tensor:
    """A 3×3, stride-1, zero-padded conv at N locations.

    Args:
        features: per level (B, F, H_l, W_l).
        weight: (O, F, 3, 3); bias: (O,) or None.
        image_index: (N,) image of each location in the batch.
        location_index: (N,) index into the image's concatenated, row-major locations over levels.
    Returns:
        (N, O): the dense conv's output at those locations.
    """
    n = location_index.shape[0]
    flat_weight = weight.flatten(1)  # (O, F·9)
    out = features[0].new_zeros((n, flat_weight.shape[0]))
    taps = torch.arange(-1, 2, device=location_index.device)
    offset = 0
    for feat in features:
        h, w = feat.shape[-2:]
        index = ((location_index >= offset) & (location_index < offset + h * w)).nonzero()[:, 0]
        local = location_index[index] - offset
        ys = (local // w)[:, None, None] + taps[None, :, None]  # (n_l, 3, 1)
        xs = (local % w)[:, None, None] + taps[None, None, :]  # (n_l, 1, 3)
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)  # (n_l, 3, 3): zero padding
        pixel = image_index[index][:, None, None] * (h * w) + ys * w + xs
        pixel = torch.where(inside, pixel, torch.zeros_like(pixel))
        channels = feat.shape[1]
        pixels = feat.permute(0, 2, 3, 1).reshape(-1, channels)  # (B·h·w, F)
        patches = pixels.index_select(0, pixel.flatten()).reshape(index.shape[0], 9, channels)
        patches = patches * inside.reshape(index.shape[0], 9, 1).to(patches.dtype)
        value = F.linear(patches.transpose(1, 2).flatten(1), flat_weight, bias)  # (n_l, O)
        out = out.index_put((index,), value.to(out.dtype))
        offset = offset + h * w
    return out
