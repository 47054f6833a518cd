"""FCOS head (the improved version BlendMask uses): GN towers, centerness on the box tower."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dynaseg.layers.norm import get_norm

__all__ = ["FCOSHead", "FCOSOutputs"]


class FCOSOutputs(NamedTuple):
    """Raw per-level head outputs; the same units in training and inference."""

    cls_logits: list[Tensor]  # per level (B, C, H_l, W_l)
    box_ltrb: list[Tensor]  # per level (B, 4, H_l, W_l): distances to box sides / stride, >= 0
    centerness: list[Tensor]  # per level (B, 1, H_l, W_l) logits
    box_tower: list[
        Tensor
    ]  # per level (B, F, H_l, W_l): box-tower features (BlendMask's top layer input)
    cls_tower: list[Tensor]  # per level (B, F, H_l, W_l): class-tower features


class _Tower(nn.Module):
    """``num_convs`` × [3×3 conv, norm, ReLU] shared over levels.

    BN keeps separate statistics per level (indexed explicitly); GN is shared.
    """

    def __init__(self, channels: int, num_convs: int, norm: str, num_levels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_convs)
        )
        per_level = norm in ("BN", "SyncBN")
        self.norms = nn.ModuleList(
            nn.ModuleList(get_norm(norm, channels) for _ in range(num_levels if per_level else 1))
            for _ in range(num_convs)
        )

    def forward(self, x: Tensor, level: int) -> Tensor:
        for conv, norms in zip(self.convs, self.norms):
            x = F.relu(norms[level if len(norms) > 1 else 0](conv(x)))
        return x


class FCOSHead(nn.Module):
    """Classification, box-regression and centerness predictions on every FPN level.

    Args:
        in_channels: FPN width F.
        num_classes: C, foreground classes (no background channel: sigmoid outputs).
        num_levels: number of pyramid levels the head is applied to.
        num_convs: depth of each tower. num_share_convs: convs both towers share, run first
            (AdelaiDet's ``share_tower``; its real-time BlendMask has 3 shared and 0 per tower).
        norm: tower norm (GN default; BN gets per-level statistics).
        prior_prob: initial foreground probability of the classifier.
        use_scale: learnable per-level multiplier on the regression output.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        num_convs: int = 4,
        num_share_convs: int = 0,
        norm: str = "GN",
        prior_prob: float = 0.01,
        use_scale: bool = False,
    ) -> None:
        super().__init__()
        self.share_tower = _Tower(in_channels, num_share_convs, norm, num_levels)
        self.cls_tower = _Tower(in_channels, num_convs, norm, num_levels)
        self.box_tower = _Tower(in_channels, num_convs, norm, num_levels)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels)) if use_scale else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> FCOSOutputs:
        cls_logits, box_ltrb, centerness, box_tower, cls_tower = [], [], [], [], []
        for level, x in enumerate(features):
            x = self.share_tower(x, level)
            cls_feat = self.cls_tower(x, level)
            box_feat = self.box_tower(x, level)
            reg = self.bbox_pred(box_feat)
            if self.scales is not None:
                reg = reg * self.scales[level]
            cls_logits.append(self.cls_logits(cls_feat))
            box_ltrb.append(F.relu(reg))
            centerness.append(self.ctrness(box_feat))
            box_tower.append(box_feat)
            cls_tower.append(cls_feat)
        return FCOSOutputs(cls_logits, box_ltrb, centerness, box_tower, cls_tower)
