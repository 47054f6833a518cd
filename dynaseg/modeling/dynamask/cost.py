"""Measured per-instance cost of DynaMask's mask head at each exit resolution, and of the MSM.

Counts come from ``torch.utils.flop_counter.FlopCounterMode`` on one dummy RoI, so they follow the
head we actually built (widths, FAM form, predictors). With the default widths at C = 256 they are
0.231 / 0.607 / 1.020 / 1.393 GMAC, within 2.1 % of the paper's Table 7 (0.23 / 0.62 / 1.01 / 1.40 G,
the paper's "FLOPs" being multiply-accumulates). Units: GMAC (multiply-accumulates · 1e-9;
FlopCounterMode counts 2 FLOPs per MAC).

What is counted: convolutions, deformable convolutions (formula registered below; FlopCounterMode
silently skips ``torchvision::deform_conv2d`` otherwise), matmuls (the label-picked 1×1 predictors,
the MSM's FC layers). What is not: RoIAlign crops (counted as 0: torchvision's op has no formula and
its cost is bilinear sampling, not MACs), bilinear upsampling, the DCN's own bilinear sampling of
its inputs (≈ 4 MACs per sampled value, about 1.5 % of the DCN), element-wise ops (ReLU, bias,
norm, SE scaling, max-pool).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynaseg.layers.flop_count import count_gmacs, eval_mode

__all__ = ["mask_head_macs", "msm_macs"]


def _dummy_inputs(
    head: nn.Module, channels: int, num_classes: int
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """One RoI covering a 128×128 image, random FPN maps for the head's crop levels, label C-1."""
    param = next(head.parameters())
    image = 128
    side = head.sides[0]
    features = {
        level: torch.randn(
            1,
            channels,
            max(1, image // stride),
            max(1, image // stride),
            device=param.device,
            dtype=param.dtype,
        )
        for level, stride in zip(head.stage_levels, head.strides)
    }
    rois = torch.tensor(
        [[0.0, 0.0, 0.0, float(image), float(image)]], device=param.device, dtype=param.dtype
    )
    roi_feats = torch.randn(1, channels, side, side, device=param.device, dtype=param.dtype)
    labels = torch.full((1,), num_classes - 1, device=param.device, dtype=torch.long)
    return roi_feats, features, rois, labels


def mask_head_macs(head: nn.Module, *, channels: int, num_classes: int) -> dict[int, float]:
    """Per-instance GMAC of the mask head when the instance exits at each resolution.

    Exiting at r_k runs what ``head.forward_early_exit`` runs for that instance: L_tiny, stages
    0..k-1 (crops counted as 0) and the mask predictor at k. Each piece is counted once on one dummy
    RoI (one pass through the head instead of K) and the pieces are summed. The lateral 1×1 conv is
    counted on the RoI's own crop (its marginal cost; with many RoIs the head may project the whole
    level once instead, which is cheaper in total). The 14×14 RoI pooling
    before the head and the MSM are not included (see ``msm_macs``).

    head: a ``DynaMaskHead``; channels: its input width C; num_classes: its class count
    → {14: g_14, 28: g_28, 56: g_56, 112: g_112} in GMAC.
    """
    if channels != head.in_channels or num_classes != head.num_classes:
        raise ValueError(
            f"head has C={head.in_channels}, {head.num_classes} classes; "
            f"got channels={channels}, num_classes={num_classes}"
        )
    roi_feats, features, rois, labels = _dummy_inputs(head, channels, num_classes)
    costs = {}
    with eval_mode(head):
        path, region = count_gmacs(lambda: head.tiny(roi_feats))  # path: cost of reaching L_k
        for k, side in enumerate(head.sides):
            costs[side] = path + count_gmacs(lambda: head.mask_logits_at(k, region, labels))[0]
            if k < head.num_resolutions - 1:
                stage_cost, region = count_gmacs(
                    lambda: head.stage(k, region, features, rois, project_first=False)
                )
                path += stage_cost
    return costs


def msm_macs(msm: nn.Module, *, channels: int, input_size: int = 14) -> float:
    """Per-instance GMAC of the Mask Switch Module on a (1, C, s, s) RoI feature (convs + FCs)."""
    param = next(msm.parameters())
    x = torch.randn(1, channels, input_size, input_size, device=param.device, dtype=param.dtype)
    with eval_mode(msm):
        return count_gmacs(lambda: msm(x))[0]
