"""BlendMask's bottom module (ProtoNet-style bases)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from dynaseg.layers.conv_norm import conv_norm_relu

__all__ = ["BasisModule"]


class BasisModule(nn.Module):
    """K bases at stride 4 from P3-P5 (and optionally P2).

    Each input level is refined to ``channels`` wide, resized to P3's size and summed; then
    ``num_convs`` conv blocks, ×2 bilinear upsampling, one more block and a 1×1 conv to K bases.
    With ``stride4_skip``, refined P2 is added after the upsampling (a DeepLabV3+-style low-level
    skip), so the bases see stride-4 detail that P3 has already pooled away.

    Args:
        in_channels: FPN width. channels: tower width (128 in the paper). num_bases: K.
        num_convs: tower depth before upsampling. norm: tower norm.
        num_levels: how many pyramid levels (from P3) feed the module (3 = P3-P5).
        stride4_skip: whether ``forward`` takes P2 too.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int = 128,
        num_bases: int = 4,
        num_convs: int = 3,
        norm: str = "BN",
        num_levels: int = 3,
        stride4_skip: bool = False,
    ) -> None:
        super().__init__()
        self.refine = nn.ModuleList(
            conv_norm_relu(in_channels, channels, norm) for _ in range(num_levels)
        )
        self.tower = nn.Sequential(
            *(conv_norm_relu(channels, channels, norm) for _ in range(num_convs))
        )
        self.skip = conv_norm_relu(in_channels, channels, norm) if stride4_skip else None
        self.post_upsample = conv_norm_relu(channels, channels, norm)
        self.predictor = nn.Conv2d(channels, num_bases, 1)

    def forward(self, features: list[Tensor], p2: Tensor | None = None) -> Tensor:
        """features: [P3 (B, F, H/8, W/8), P4, P5]; p2: (B, F, H/4, W/4) with ``stride4_skip``
        → bases (B, K, H/4, W/4)."""
        x = self.refine[0](features[0])
        for refine, feat in zip(self.refine[1:], features[1:]):
            x = x + F.interpolate(
                refine(feat), size=x.shape[-2:], mode="bilinear", align_corners=False
            )
        x = self.tower(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if self.skip is not None:
            if p2 is None:
                raise ValueError("this BasisModule has a stride-4 skip: pass p2")
            x = x[..., : p2.shape[-2], : p2.shape[-1]] + self.skip(p2)  # 2⌈H/8⌉ ≥ ⌈H/4⌉
        return self.predictor(self.post_upsample(x))
