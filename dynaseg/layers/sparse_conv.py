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
    out = features[0].new_empty((n, flat_weight.shape[0]))
    offset = 0
    for feat in features:
        h, w = feat.shape[-2:]
        in_level = (location_index >= offset) & (location_index < offset + h * w)
        if in_level.any():
            local = location_index[in_level] - offset
            ys, xs = local // w, local % w
            padded = F.pad(feat, (1, 1, 1, 1))
            d = torch.arange(3, device=feat.device)
            rows = (ys[:, None] + d)[:, :, None]  # (n, 3, 1)
            cols = (xs[:, None] + d)[:, None, :]  # (n, 1, 3)
            patches = padded[image_index[in_level][:, None, None], :, rows, cols]  # (n, 3, 3, F)
            patches = patches.permute(0, 3, 1, 2).flatten(1)  # (n, F·9)
            out[in_level] = F.linear(patches, flat_weight, bias).to(out.dtype)
        offset += h * w
    return out
