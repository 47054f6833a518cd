"""Mask R-CNN's FCN mask head, as a ``MaskBranch``: class-specific 28×28 masks from 14×14 RoI features."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from dynaseg.layers.flop_count import count_gmacs, eval_mode
from dynaseg.modeling.rcnn.mask_branch import MaskBranchOutput
from dynaseg.modeling.rcnn.pooler import multilevel_roi_align
from dynaseg.structures.masks import roi_mask_targets

__all__ = ["FCNMaskHead", "fcn_mask_loss", "fcn_mask_probs"]


def fcn_mask_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
    """Mean BCE of each RoI's GT-class channel. mask_logits: (P, C, S, S); labels: (P,); targets: (P, S, S) in {0, 1}.

    Exactly 0 (still connected to the graph) when P = 0.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(len(labels), device=labels.device), labels]  # (P, S, S)
    return F.binary_cross_entropy_with_logits(picked.float(), mask_targets.float())


def fcn_mask_probs(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid of each detection's predicted-class channel: (N, C, S, S), (N,) → (N, S, S)."""
    s = mask_logits.shape[-1]
    index = labels[:, None, None, None].expand(-1, 1, s, s)  # a gather keeps N dynamic in a trace
    return mask_logits.gather(1, index)[:, 0].sigmoid()


class FCNMaskHead(nn.Module):
    """14×14 aligned multilevel RoIAlign → ``num_convs`` × [3×3 conv, ReLU] (torchvision ``MaskRCNNHeads``)
    → 2×2 stride-2 deconv, ReLU, 1×1 conv to C logits at 28×28 (torchvision ``MaskRCNNPredictor``).

    Args:
        in_channels: FPN width. num_classes: C (class-specific masks, no background channel).
        conv_dim, num_convs: FCN width and depth. resolution: mask side (2 × pooler_resolution).
        pooler_resolution, sampling_ratio: RoIAlign output side and samples per bin (2: fixed cost per RoI).
        pooler_aligned: half-pixel RoIAlign (detectron2); False as torchvision's Mask R-CNN.
        loss_weight: weight of ``loss_mask``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        conv_dim: int = 256,
        num_convs: int = 4,
        resolution: int = 28,
        pooler_resolution: int = 14,
        sampling_ratio: int = 2,
        pooler_aligned: bool = True,
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if resolution != 2 * pooler_resolution:
            raise ValueError(
                f"resolution ({resolution}) must be 2 × pooler_resolution ({pooler_resolution})"
            )
        self.resolution, self.pooler_resolution, self.sampling_ratio = (
            resolution,
            pooler_resolution,
            sampling_ratio,
        )
        self.pooler_aligned, self.loss_weight = pooler_aligned, loss_weight
        self.convs = MaskRCNNHeads(in_channels, [conv_dim] * num_convs, dilation=1)
        self.predictor = MaskRCNNPredictor(
            conv_dim if num_convs else in_channels, conv_dim, num_classes
        )
        # detectron2's init of the logit layer (torchvision's Kaiming init starts with |logits| ≫ 1)
        nn.init.normal_(self.predictor.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(self.predictor.mask_fcn_logits.bias)

    def gmac_per_resolution(self) -> dict[int, float]:
        """GMAC per instance of the 4 convs, deconv and predictor on one 14×14 RoI feature."""
        x = torch.zeros(
            1, self.convs[0][0].in_channels, self.pooler_resolution, self.pooler_resolution
        )
        with eval_mode(self):
            gmac, _ = count_gmacs(lambda: self.predictor(self.convs(x)))
        return {self.resolution: gmac}

    def overhead_gmac(self) -> float:
        return 0.0

    def forward(self, features: dict[str, Tensor], rois: Tensor) -> Tensor:
        """rois: (N, 5) [b, x0, y0, x1, y1] → class-specific mask logits (N, C, 28, 28)."""
        x = multilevel_roi_align(
            features,
            rois,
            output_size=self.pooler_resolution,
            sampling_ratio=self.sampling_ratio,
            aligned=self.pooler_aligned,
        )  # (N, F, 14, 14)
        return self.predictor(self.convs(x))

    def losses(
        self,
        *,
        features: dict[str, Tensor],
        rois: Tensor,
        labels: Tensor,
        gt_masks: list[Tensor],
        gt_index: Tensor,
    ) -> dict[str, Tensor]:
        """``{"loss_mask"}`` for P positive RoIs (see ``MaskBranch.losses``); targets are the matched GT
        masks sampled inside each *proposal* box (``roi_mask_targets``) at 28×28."""
        targets = roi_mask_targets(gt_masks, rois, gt_index, self.resolution)  # (P, 28, 28)
        return {
            "loss_mask": self.loss_weight * fcn_mask_loss(self(features, rois), labels, targets)
        }

    def predict(
        self,
        *,
        features: dict[str, Tensor],
        rois: Tensor,
        labels: Tensor,
        image_sizes: Tensor | list[tuple[int, int]],
    ) -> MaskBranchOutput:
        """Masks of N detections (rois (N, 5), predicted labels (N,)): (N, 28, 28) probabilities."""
        probs = fcn_mask_probs(self(features, rois), labels)  # (N, 28, 28)
        return MaskBranchOutput(probs, torch.full_like(labels, self.resolution))
