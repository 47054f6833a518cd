"""The size-based mask selection baseline of the DynaMask paper (§4.3, Eq. 8, Tables 8-9)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["size_based_resolution"]


def size_based_resolution(
    boxes: Tensor, *, canonical_size: float | Tensor, k0: int = 4, num_choices: int = 4
) -> Tensor:
    """Resolution index from box size, paper Eq. 8: k = ⌊k0 + log2(√(wh) / √(w0·h0))⌋.

    k is 1-based over the K candidates ordered from the smallest (14, 28, 56, 112); k0 = 4 is the
    index of the highest resolution 112×112. k is clamped to [1, K] and returned 0-based (k − 1).

    ``canonical_size`` is √(w0·h0), scalar or (N,) per box. As written, w0, h0 are "the width and
    height of the input image" (pass √(w0·h0) of each box's image: the detector's default). Eq. 8
    has the form of FPN's level rule, whose constant is 224, "the canonical ImageNet pre-training
    size"; passing 224 gives thresholds √(wh) = 56 / 112 / 224 px for k = 2 / 3 / 4, a split
    closer to the paper's Table 9. Both readings are documented in docs/fidelity.md.

    boxes: (N, 4) XYXY absolute pixels → (N,) int64 in [0, num_choices − 1].
    """
    wh = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).double().clamp_min(1e-12)
    canonical = torch.as_tensor(canonical_size, dtype=torch.float64, device=boxes.device)
    k = torch.floor(k0 + torch.log2(wh.sqrt() / canonical))
    return (k.clamp(1, num_choices) - 1).long()
