"""ResNet-18/34/50/101 feature extractor with a configurable width.

Built from torchvision's residual blocks with torchvision's parameter names, so a torchvision
ImageNet checkpoint loads directly when ``width == 64``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from dynaseg.layers.deform_conv import ModulatedDeformConv3x3
from dynaseg.layers.norm import get_norm, norm_factory

__all__ = ["ResNet", "RESNET_LAYERS"]

RESNET_LAYERS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """Returns ``{"c2": stride 4, "c3": 8, "c4": 16, "c5": 32}`` feature maps.

    Args:
        depth: 18, 34, 50 or 101.
        width: channels of the stem and of the first stage's bottleneck (64 in the standard nets).
        norm: name for ``get_norm`` (FrozenBN, BN, GN, SyncBN).
        freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 also freezes res2..res{k}.
        stride_in_1x1: a stage's stride in its first block's 1×1 conv (the original ResNet, MSRA's
            and detectron2's weights) instead of its 3×3 conv (torchvision's "v1.5").
        deform_stages: stages (3, 4, 5 = res3-res5) whose blocks' 3×3 convs are DCNv2
            (``ModulatedDeformConv3x3``, bottleneck ResNets); deform_interval: every k-th block of
            those stages, from the first (AdelaiDet's "dcni3" = 3).
    """

    def __init__(
        self,
        *,
        depth: int,
        width: int = 64,
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        stride_in_1x1: bool = False,
        deform_stages: tuple[int, ...] = (),
        deform_interval: int = 1,
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(
                f"unsupported ResNet depth {depth}; choose from {sorted(RESNET_LAYERS)}"
            )
        block, counts = RESNET_LAYERS[depth]
        norm_layer = norm_factory(norm)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = get_norm(norm, width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = width
        self.out_channels: dict[str, int] = {}
        for i, count in enumerate(counts):
            planes = width * 2**i
            layer, in_channels = self._make_stage(
                block, in_channels, planes, count, 1 if i == 0 else 2, norm_layer
            )
            if stride_in_1x1 and i > 0 and block is Bottleneck:
                first = layer[0]  # torchvision's block reads its convs' strides in forward
                first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
            if i + 2 in deform_stages:
                if block is not Bottleneck:
                    raise ValueError(
                        f"deformable stages need a bottleneck ResNet, not depth {depth}"
                    )
                for b in range(0, count, deform_interval):
                    conv = layer[b].conv2
                    layer[b].conv2 = ModulatedDeformConv3x3(
                        conv.in_channels, conv.out_channels, stride=conv.stride[0]
                    )
            setattr(self, f"layer{i + 1}", layer)
            self.out_channels[f"c{i + 2}"] = in_channels
        self._init_weights()
        self._freeze(freeze_at)

    @staticmethod
    def _make_stage(block, in_channels: int, planes: int, count: int, stride: int, norm_layer):
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                norm_layer(out_channels),
            )
        blocks = [block(in_channels, planes, stride, downsample, norm_layer=norm_layer)]
        blocks += [block(out_channels, planes, norm_layer=norm_layer) for _ in range(count - 1)]
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # DCNv2 starts as the plain conv: zero offsets and logits
            if isinstance(m, ModulatedDeformConv3x3):
                nn.init.zeros_(m.offset.weight)
                nn.init.zeros_(m.offset.bias)

    def _freeze(self, freeze_at: int) -> None:
        frozen = [self.conv1, self.bn1] if freeze_at >= 1 else []
        frozen += [getattr(self, f"layer{i - 1}") for i in range(2, freeze_at + 1) if 2 <= i <= 5]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, H, W) normalised image → {"c2".."c5"}: (B, C_i, H/s, W/s)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out[f"c{i + 1}"] = x
        return out
