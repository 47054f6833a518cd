"""DynaMask's Feature Aggregation Module (FAM, paper §3.1, Fig. 3).

It fuses an r-FPN region feature L_r (upsampled from the previous r-FPN stage) with the RoI crop
P_i of an i-FPN level at the same size, using two deformable convolutions (DCNv1, the paper's
[8]; torchvision's op via ``layers/deform_conv.py``, no modulation mask).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dynaseg.layers.deform_conv import DeformConv2d
from dynaseg.layers.norm import get_norm

__all__ = ["FeatureAggregationModule"]


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3×3 offset predictor, weight and bias zero: the deformable conv starts as a plain conv."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FeatureAggregationModule(nn.Module):
    """FAM: align L_r to P_i with a deformable conv, fuse, then a second deformable conv.

    Steps (paper §3.1 sentences quoted):
      1. Δ_o = Conv3×3(concat(L_r, P_i)): "we first concatenate L_r with P_i, and then pass the
         concatenated features through a 3×3 Conv to obtain the offset map, denoted by Δ_o".
      2. L'_r = ReLU(DeformConv1(L_r; Δ_o)): "L_r is aligned to P_i with the learned offset Δ_o"
         (Deform_Conv1 "adjusts the positions of L_r, making it better aligned to P_i").
      3. F = ReLU(norm(Conv1×1(concat(L'_r, P_i)))): the aggregation of the two features. The paper
         text does not spell this step out (Fig. 3 only); concat + 1×1 is the authors' two-DCN form.
      4. out = ReLU(norm(DeformConv2(F; Conv3×3(F)))): Deform_Conv2 "works like an attention
         mechanism, which attends to the salient parts of objects": a DCNv1 whose offsets come from
         its own input, so it samples where the fused feature points. No gating, no DCNv2 mask:
         the paper cites DCNv1 [8] for both convolutions.
    Both offset convs are zero-initialised, so at initialisation each DCN equals a plain 3×3 conv.

    Args:
        channels: width C of L_r, P_i and the output.
        deform_groups: offset groups G of each DCN (2·G·9 offset channels).
        norm: norm after the fuse conv and after Deform_Conv2 (``get_norm`` name).
    """

    def __init__(self, *, channels: int, deform_groups: int = 1, norm: str = "none") -> None:
        super().__init__()
        offsets = 2 * deform_groups * 9
        self.align_offset = _zero_conv(2 * channels, offsets)
        self.align_conv = DeformConv2d(channels, channels, 3, padding=1)
        self.fuse = nn.Conv2d(2 * channels, channels, 1, bias=norm == "none")
        self.fuse_norm = get_norm(norm, channels)
        self.attend_offset = _zero_conv(channels, offsets)
        self.attend_conv = DeformConv2d(channels, channels, 3, padding=1, bias=norm == "none")
        self.attend_norm = get_norm(norm, channels)
        nn.init.kaiming_normal_(self.fuse.weight, mode="fan_out", nonlinearity="relu")
        if self.fuse.bias is not None:
            nn.init.zeros_(self.fuse.bias)

    def forward(self, region_feature: Tensor, pyramid_feature: Tensor) -> Tensor:
        """region_feature L_r: (N, C, s, s); pyramid_feature P_i: (N, C, s, s) → (N, C, s, s)."""
        offset = self.align_offset(
            torch.cat([region_feature, pyramid_feature], dim=1)
        )  # Δ_o (N, 2G·9, s, s)
        # In-place ReLUs: conv, deformable conv and GroupNorm backward passes do not need their outputs.
        aligned = F.relu(self.align_conv(region_feature, offset), inplace=True)
        fused = F.relu(
            self.fuse_norm(self.fuse(torch.cat([aligned, pyramid_feature], dim=1))), inplace=True
        )
        attended = self.attend_conv(fused, self.attend_offset(fused))
        return F.relu(self.attend_norm(attended), inplace=True)
