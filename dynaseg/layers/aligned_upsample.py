"""×2 upsampling that keeps pyramid levels aligned at any input size (DR1Mask §3.3, Table 5).

With size divisibility 4 instead of 32, a level can be one cell larger than twice the next coarser
level (e.g. 101 and 51). Upsampling ×2 and cropping the bottom/right edge, rather than resizing to
the exact size, keeps every coarse cell on the fine cell it came from.

A stride-2 convolution (3×3, padding 1, as in ResNet and the FPN's P6/P7) computes coarse cell i
centred on fine cell 2i. ``aligned_upsample`` inverts that: fine cell 2i gets coarse cell i exactly,
fine cell 2i + 1 the mean of cells i and i + 1 (bilinear), the last one replicated past the edge.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

__all__ = ["aligned_upsample", "nearest_upsample_crop"]


def _check(x: Tensor, size: tuple[int, int]) -> None:
    h, w = x.shape[-2:]
    if not (2 * h - 1 <= size[0] <= 2 * h and 2 * w - 1 <= size[1] <= 2 * w):
        raise ValueError(
            f"cannot upsample {h}×{w} ×2 to {size[0]}×{size[1]}: "
            f"the finer level must be {2 * h - 1} or {2 * h} by {2 * w - 1} or {2 * w}"
        )


def aligned_upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear ×2 with coarse cell i on fine cell 2i, cropped to ``size``.

    x: (B, C, h, w) → (B, C, size[0], size[1]) with size[k] ∈ {2·n_k - 1, 2·n_k}.
    """
    _check(x, size)
    h, w = x.shape[-2:]
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")
    up = F.interpolate(padded, size=(2 * h + 1, 2 * w + 1), mode="bilinear", align_corners=True)
    return up[..., : size[0], : size[1]]


def nearest_upsample_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest ×2 (each coarse cell covers fine cells 2i, 2i + 1), cropped to ``size``."""
    _check(x, size)
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return up[..., : size[0], : size[1]]
