"""Deformable convolution: DCNv1 (torchvision's op, with a faster CPU path) and DCNv2's 3×3 conv.

torchvision's CPU ``deform_conv2d`` is slow, its backward pass most of all (measured here on 64
RoIs of 8×112×112: 0.6 s forward + 4.3 s backward, against 0.1 s for a plain conv). On the CPU we
compute the same function as bilinear sampling of the nine shifted grids (``grid_sample``, zero
padding, exactly torchvision's interpolation) followed by one matrix product: 0.23 s + 0.46 s on
the same input, equal outputs and gradients (tests compare both, and ``gradcheck`` both in float64).
On CUDA, and for strided / dilated / grouped / modulated calls, torchvision's op runs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision import ops

__all__ = ["DeformConv2d", "ModulatedDeformConv3x3", "deform_conv2d_sampled"]


def deform_conv2d_sampled(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int = 1,
    *,
    band_bytes: int = 4 << 20,
) -> Tensor:
    """DCNv1, stride 1, dilation 1, weight groups 1, as sampling + matmul.

    x: (N, C, H, W); offset: (N, 2·G·K, H, W) with (Δy, Δx) per kernel tap k = i·kw + j and offset
    group G (torchvision's layout); weight: (C_out, C, kh, kw) → (N, C_out, H_out, W_out).

    Without gradients (eager inference, not while tracing) the sampled columns are made ``band_bytes`` at a time (a few
    instances, or a band of output rows of one): the whole (N, C·K, H_out·W_out) column tensor of
    100 RoIs at 112×112 is 1.4 GB, and writing then re-reading it from main memory made this
    op 1.5-2× slower on the CPU (measured; the bands stay in cache). Same result, bit for bit.
    """
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    k = kh * kw
    groups = offset.shape[1] // (2 * k)
    h_out, w_out = offset.shape[-2:]
    ky, kx = torch.meshgrid(
        torch.arange(kh, device=x.device), torch.arange(kw, device=x.device), indexing="ij"
    )
    base_y = (
        torch.arange(h_out, device=x.device, dtype=x.dtype)[None, :, None]
        - padding
        + ky.reshape(k, 1, 1)
    )
    base_x = (
        torch.arange(w_out, device=x.device, dtype=x.dtype)[None, None, :]
        - padding
        + kx.reshape(k, 1, 1)
    )
    off = offset.view(n, groups, k, 2, h_out, w_out)
    x = x.reshape(n * groups, c // groups, h, w)
    wmat = weight.reshape(c_out, c * k)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, offset, weight))
    # Bands are Python loops over sizes: not under autograd, and not while tracing (ONNX export).
    whole = needs_grad or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    row_bytes = c * k * w_out * x.element_size()
    rows = h_out if whole else max(1, min(h_out, band_bytes // row_bytes))
    per_step = n if whole else (max(1, band_bytes // (row_bytes * h_out)) if rows == h_out else 1)

    def columns(i: int, j: int, r0: int, r1: int) -> Tensor:
        """Sampled inputs of instances i:j, output rows r0:r1 → (j − i, C·K, (r1 − r0)·W_out)."""
        o = off[i:j, :, :, :, r0:r1]
        # Sampling positions in pixels → grid_sample's [-1, 1] with align_corners=True (pixel centres).
        gy = (base_y[:, r0:r1] + o[:, :, :, 0]) * (2.0 / max(h - 1, 1)) - 1  # (n', G, K, r, Wo)
        gx = (base_x + o[:, :, :, 1]) * (2.0 / max(w - 1, 1)) - 1
        grid = torch.stack([gx, gy], dim=-1).view((j - i) * groups, k * (r1 - r0), w_out, 2)
        sampled = F.grid_sample(
            x[i * groups : j * groups],
            grid,
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )  # (n'·G, C/G, K·r, Wo)
        return sampled.reshape(j - i, c * k, (r1 - r0) * w_out)

    def weighted(cols: Tensor) -> Tensor:
        """(n', C·K, P) → (n', C_out, P). ``bmm`` on the expanded weight: ``matmul`` would fold the
        batch into one product through a transposed copy of the columns, forward and backward
        (64 RoIs of 8×112×112, one thread: 2.7 s → 1.9 s forward + backward)."""
        return torch.bmm(wmat.expand(cols.shape[0], -1, -1), cols)

    if rows == h_out and per_step >= n:
        out = weighted(columns(0, n, 0, h_out)).view(n, c_out, h_out, w_out)
    else:
        out = x.new_empty(n, c_out, h_out, w_out)
        for i in range(0, n, per_step):
            j = min(n, i + per_step)
            for r0 in range(0, h_out, rows):
                r1 = min(h_out, r0 + rows)
                out[i:j, :, r0:r1] = weighted(columns(i, j, r0, r1)).view(
                    j - i, c_out, r1 - r0, w_out
                )
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class DeformConv2d(ops.DeformConv2d):
    """``torchvision.ops.DeformConv2d`` (same parameters and state dict) with the CPU fast path."""

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        plain = (
            self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1 and mask is None
        )
        if input.device.type == "cpu" and plain and self.padding[0] == self.padding[1]:
            return deform_conv2d_sampled(input, offset, self.weight, self.bias, self.padding[0])
        return super().forward(input, offset, mask)


class ModulatedDeformConv3x3(nn.Module):
    """DCNv2's 3×3 conv (Zhu et al. 2019): a plain 3×3 conv (``offset``) predicts, per output
    position, 18 offsets ((Δy, Δx) per tap, torchvision's and detectron2's layout) and 9 modulation
    logits; torchvision's ``deform_conv2d`` samples with both. Zero-initialised offsets and logits
    start it as the plain conv at half weight (σ(0) = 0.5), as detectron2's ``DeformBottleneckBlock``.

    Args: in_channels, out_channels, stride (no bias: a norm follows in a ResNet block).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.offset = nn.Conv2d(in_channels, 27, 3, stride=stride, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) → (N, C_out, H / stride, W / stride)."""
        offset_mask = self.offset(x)
        return ops.deform_conv2d(
            x,
            offset_mask[:, :18],
            self.weight,
            stride=self.stride,
            padding=1,
            mask=offset_mask[:, 18:].sigmoid(),
        )
