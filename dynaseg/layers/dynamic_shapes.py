"""Small tensor helpers written so that a trace (ONNX export) keeps data-dependent sizes dynamic.

Eagerly each gives what the obvious PyTorch call gives. While tracing, Python values computed from
tensors are baked into the graph (``min(k, len(x))``, ``torch.tensor(width)``, ``if x.numel()``);
these helpers compute such values as tensors instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["topk_at_most", "clip_boxes", "image_size_tensor", "guard_empty_rows", "valid_pixels"]


def topk_at_most(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``values.topk(min(k, len(values)))`` for 1-D values, the minimum taken as a tensor."""
    count = torch._shape_as_tensor(values)[0]
    return values.topk(torch.clamp(count, max=k))


def clip_boxes(boxes: Tensor, image_size: Tensor) -> Tensor:
    """(N, 4) XYXY clipped to [0, w] × [0, h]; image_size: (2,) [h, w] (torchvision's
    ``clip_boxes_to_image`` takes Python ints, which a trace would bake in)."""
    hw = image_size.to(boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), hw.flip(0).repeat(2))


def image_size_tensor(image_sizes: Tensor | list[tuple[int, int]], device: torch.device) -> Tensor:
    """Valid (h, w) per image as a (B, 2) int64 tensor (a list of pairs, or already a tensor)."""
    if isinstance(image_sizes, Tensor):
        return image_sizes.to(device=device, dtype=torch.int64).reshape(-1, 2)
    return torch.tensor(image_sizes, dtype=torch.int64, device=device).reshape(-1, 2)


def valid_pixels(image_sizes: Tensor, height: int, width: int) -> Tensor:
    """(B, 1, height, width) float: 1 inside each image's valid (h, w), 0 in the padding."""
    rows = torch.arange(height, device=image_sizes.device)[None, :] < image_sizes[:, :1]
    cols = torch.arange(width, device=image_sizes.device)[None, :] < image_sizes[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[:, None].float()


def guard_empty_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """While tracing, each tensor with one extra all-zero row (dim 0); eagerly unchanged.

    onnxruntime fails on some empty inputs that PyTorch takes (Einsum raises SIGFPE, a 2-D × 3-D
    MatMul a broadcast error): with one spare row, a graph traced for N rows runs for N = 0 too.
    Callers drop the spare row from the result (``[:n]``, a no-op eagerly).
    """
    if not torch.jit.is_tracing():
        return tensors
    return tuple(torch.cat([x, x.new_zeros((1, *x.shape[1:]))]) for x in tensors)
