"""ResNet + FPN producing P3-P7 (FCOS / BlendMask layout)."""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from dynaseg.layers.norm import norm_factory
from dynaseg.modeling.backbone.resnet import ResNet

__all__ = ["ResNetFPN"]


class ResNetFPN(nn.Module):
    """FPN on res3-res5 with P6 from P5 and P7 from ReLU(P6), every level ``out_channels`` wide.

    Returns ``{"p3": stride 8, ..., "p7": stride 128}``, each (B, out_channels, H/s, W/s).
    """

    def __init__(self, *, body: ResNet, out_channels: int, norm: str = "none") -> None:
        super().__init__()
        self.body = body
        in_channels = [body.out_channels[k] for k in ("c3", "c4", "c5")]
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=in_channels,
            out_channels=out_channels,
            extra_blocks=LastLevelP6P7(out_channels, out_channels),
            norm_layer=None if norm == "none" else norm_factory(norm),
        )
        self.out_channels = out_channels
        self.strides = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.body(images)
        pyramid = self.fpn(OrderedDict((k, feats[k]) for k in ("c3", "c4", "c5")))
        return {f"p{i + 3}": v for i, v in enumerate(pyramid.values())}
