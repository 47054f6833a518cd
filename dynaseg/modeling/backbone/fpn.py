"""ResNet + FPN in the layouts the models need: P3-P7 (FCOS / BlendMask), P2-P6 (Mask R-CNN), and
AdelaiDet's lighter P3-P6 / P3-P5 (550 px and real-time BlendMask)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from dynaseg.layers.aligned_upsample import nearest_upsample_crop
from dynaseg.layers.norm import norm_factory
from dynaseg.modeling.backbone.resnet import ResNet

__all__ = ["ResNetFPN"]


class _CroppingFPN(FeaturePyramidNetwork):
    """torchvision's FPN whose top-down path upsamples ×2 and crops the bottom/right edge.

    torchvision resizes the coarser map to the finer one's size, which for odd sizes (size
    divisibility below 32, DR1Mask §3.3) stretches it off its cells; ×2 + crop keeps coarse cell i
    on fine cells 2i, 2i + 1. For even sizes the two are the same operation.
    """

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names, feats = list(x.keys()), list(x.values())
        last_inner = self.get_result_from_inner_blocks(feats[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.get_result_from_inner_blocks(feats[idx], idx)
            last_inner = lateral + nearest_upsample_crop(last_inner, tuple(lateral.shape[-2:]))
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results))


class _LastLevelP6(ExtraFPNBlock):
    """P6 = 3×3 stride-2 conv on P5 (initialised as torchvision's ``LastLevelP6P7``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        nn.init.kaiming_uniform_(self.p6.weight, a=1)
        nn.init.constant_(self.p6.bias, 0)

    def forward(
        self, results: list[Tensor], x: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        return [*results, self.p6(results[-1])], [*names, "p6"]


_LAST_LEVEL = {"p3p7": 7, "p3p6": 6, "p3p5": 5, "p2p6": 6, "p2p6conv": 6, "p2p7": 7}


class ResNetFPN(nn.Module):
    """FPN on a ResNet, every level ``out_channels`` wide.

    ``layout="p3p7"`` (default, FCOS/BlendMask): FPN on res3-res5, P6 = conv(P5), P7 = conv(ReLU(P6));
    returns ``{"p3": stride 8, ..., "p7": stride 128}``.
    ``layout="p2p6"`` (R-CNN): FPN on res2-res5, P6 = stride-2 subsampling of P5 (torchvision
    ``LastLevelMaxPool``, no parameters); returns ``{"p2": stride 4, ..., "p6": stride 64}``.
    ``layout="p3p6"`` / ``"p3p5"`` (AdelaiDet's ``TOP_LEVELS`` 1 / 0): FPN on res3-res5, P6 = 3×3
    stride-2 conv on P5 / no extra level.
    ``layout="p2p6conv"`` (FCOS with a stride-4 level): FPN on res2-res5, P6 = 3×3 stride-2 conv on P5
    (AdelaiDet's ``TOP_LEVELS=1``); returns ``{"p2": stride 4, ..., "p6": stride 64}``.
    ``layout="p2p7"`` (FCOS on P3-P7 with a stride-4 skip into BlendMask's bases): ``"p3p7"`` plus P2
    from res2; returns ``{"p2": stride 4, ..., "p7": stride 128}``.
    Each level is (B, out_channels, H/s, W/s); ``self.strides`` maps level name → s.

    ``p2_into_p3`` (layouts with P2 only) adds one bottom-up step after the FPN, as PANet's path
    aggregation does: P3 ← P3 + Conv3×3/2(P2), so a head on P3 sees stride-4 detail. Only P3
    changes; P6 and P7 still come from P5. Not in the papers (``docs/one_stage_accuracy.md``).
    """

    def __init__(
        self,
        *,
        body: ResNet,
        out_channels: int,
        norm: str = "none",
        layout: Literal["p3p7", "p3p6", "p3p5", "p2p6", "p2p6conv", "p2p7"] = "p3p7",
        p2_into_p3: bool = False,
    ) -> None:
        super().__init__()
        if layout not in _LAST_LEVEL:
            raise ValueError(
                f"unknown FPN layout '{layout}'; expected one of {', '.join(_LAST_LEVEL)}"
            )
        self.body = body
        self.layout = layout
        self.first_level = 3 if layout.startswith("p3") else 2
        self.in_features = tuple(f"c{i}" for i in range(self.first_level, 6))
        extra: ExtraFPNBlock | None = {
            "p3p7": lambda: LastLevelP6P7(out_channels, out_channels),
            "p3p6": lambda: _LastLevelP6(out_channels),
            "p3p5": lambda: None,
            "p2p6": LastLevelMaxPool,
            "p2p6conv": lambda: _LastLevelP6(out_channels),
            "p2p7": lambda: LastLevelP6P7(out_channels, out_channels),
        }[layout]()
        self.fpn = _CroppingFPN(
            in_channels_list=[body.out_channels[k] for k in self.in_features],
            out_channels=out_channels,
            extra_blocks=extra,
            norm_layer=None if norm == "none" else norm_factory(norm),
        )
        self.out_channels = out_channels
        self.p3_from_p2: nn.Conv2d | None = None
        if p2_into_p3:
            if self.first_level != 2:
                raise ValueError(f"p2_into_p3 needs P2; layout '{layout}' starts at P3")
            self.p3_from_p2 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
            nn.init.kaiming_uniform_(self.p3_from_p2.weight, a=1)
            nn.init.zeros_(self.p3_from_p2.bias)
        last_level = _LAST_LEVEL[layout]
        self.strides = {f"p{i}": 2**i for i in range(self.first_level, last_level + 1)}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.body(images)
        pyramid = self.fpn(OrderedDict((k, feats[k]) for k in self.in_features))
        levels = {f"p{i + self.first_level}": v for i, v in enumerate(pyramid.values())}
        if self.p3_from_p2 is not None:
            # ResNet's res3 is a stride-2 conv on res2 too, so the sizes agree (⌈⌈H/4⌉/2⌉) at any H.
            levels["p3"] = levels["p3"] + self.p3_from_p2(levels["p2"])
        return levels
