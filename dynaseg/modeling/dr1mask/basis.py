"""DR1Basis (paper §3.2.2, Eq. 6, Fig. 3): the inverted pyramid of DR1Convs giving the shared map F.

From the coarsest level down, each step reduces P^l to C_F channels, adds the ×2-upsampled result
of the level above and merges it with the level's context through a DR1Conv:

    F^L = σ(N(DR1Conv_{A^L,B^L}(Conv(P^L))))
    F^l = σ(N(DR1Conv_{A^l,B^l}(Conv(P^l) + Up(F^{l+1}))))      l = L-1 … 3

then F = σ(N(Conv3×3(Up(F^3)))) at stride 4 (Up: ``aligned_upsample``, cropped to the finer size).
σ = ReLU, N = the configured norm after the B factor (the operator's order: conv(x∘A)∘B, then
norm and activation). The paper gives C_F = 32 for instances and 64 for panoptic; "Conv" is a 3×3
convolution (the kernel size is lost in the seed text, reconstructed: see docs/fidelity.md).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn
from torch.nn import functional as F

from dynaseg.layers.aligned_upsample import aligned_upsample
from dynaseg.layers.conv_norm import conv_norm_relu
from dynaseg.layers.dr1conv import DR1Conv2d
from dynaseg.layers.norm import get_norm

__all__ = ["DR1Basis", "DynamicFactors"]

DynamicFactors = Literal["both", "pre", "post", "none"]  # paper Table 1: which of A, B are used


def _upsample(x: Tensor, size: tuple[int, int], aligned: bool) -> Tensor:
    if aligned:
        return aligned_upsample(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DR1Basis(nn.Module):
    """Args:
    in_channels: FPN width. channels: C_F. num_levels: pyramid levels used (5 = P3-P7).
    norm: norm after each DR1Conv and the output conv. aligned_upsample: ×2 aligned with the
    strided convolutions + crop (paper Table 5), else bilinear resize to the finer size.
    factors: which dynamic factors are applied (Table 1 ablation; "both" is DR1Conv).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int = 32,
        num_levels: int = 5,
        norm: str = "BN",
        aligned_upsample: bool = True,
        factors: DynamicFactors = "both",
    ) -> None:
        super().__init__()
        if factors not in ("both", "pre", "post", "none"):
            raise ValueError(f"factors must be both, pre, post or none, got '{factors}'")
        self.aligned, self.factors = aligned_upsample, factors
        self.reduce = nn.ModuleList(
            nn.Conv2d(in_channels, channels, 3, padding=1) for _ in range(num_levels)
        )
        self.merge = nn.ModuleList(DR1Conv2d(channels, channels, 3) for _ in range(num_levels))
        self.norms = nn.ModuleList(get_norm(norm, channels) for _ in range(num_levels))
        self.output = conv_norm_relu(channels, channels, norm)
        for conv in self.reduce:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(
        self,
        features: list[Tensor],
        context: list[tuple[Tensor, Tensor]],
        output_size: tuple[int, int],
    ) -> Tensor:
        """features: [P3 (B, F, H_3, W_3) … P7]; context: per level (A, B), each (B, C_F, H_l, W_l);
        output_size: the stride-4 size (Hp/4, Wp/4) → F (B, C_F, Hp/4, Wp/4)."""
        x = None
        for lv in range(len(features) - 1, -1, -1):
            y = self.reduce[lv](features[lv])
            if x is not None:
                y = y + _upsample(x, tuple(y.shape[-2:]), self.aligned)
            a, b = context[lv]
            y = self.merge[lv](
                y,
                a if self.factors in ("both", "pre") else None,
                b if self.factors in ("both", "post") else None,
            )
            x = F.relu(self.norms[lv](y))
        return self.output(_upsample(x, output_size, self.aligned))
