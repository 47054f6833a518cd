"""Region Proposal Network: torchvision's RPN components behind our (features, images, Instances) interface."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from dynaseg.structures import Instances

__all__ = ["RPN"]


class _StridedAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with the FPN strides given instead of inferred.

    torchvision infers a level's stride as ``padded_size // grid_size``, which is wrong for P6 whenever
    Hp/32 is odd (Hp = 96: P5 has 3 rows, P6 has 2, inferred stride 48 instead of 64).
    """

    def __init__(
        self,
        *,
        sizes: tuple[tuple[int, ...], ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
        strides: tuple[int, ...],
    ) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = strides

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """→ per image (A, 4) XYXY anchors, all levels concatenated in level order."""
        device = feature_maps[0].device
        self.set_cell_anchors(feature_maps[0].dtype, device)
        strides = [
            [torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides
        ]
        anchors = torch.cat(self.grid_anchors([list(f.shape[-2:]) for f in feature_maps], strides))
        return [anchors] * len(image_list.image_sizes)


class RPN(nn.Module):
    """RPN on P2-P6 (one anchor size per level, three aspect ratios), built from torchvision's
    ``AnchorGenerator``, ``RPNHead`` and ``RegionProposalNetwork``.

    torchvision applies ``pre_nms_topk`` per level and ``post_nms_topk`` per image, NMS per level
    (as detectron2 does for FPN); its box-regression loss is smooth-L1 (β = 1/9) over the sampled anchors.

    Args:
        in_channels: FPN width. in_features: level names, in order. strides: their strides (input pixels).
        anchor_sizes: one anchor side per level. aspect_ratios: h/w ratios, the same on every level.
        pre_nms_topk_*, post_nms_topk_*, nms_threshold: proposal filtering (train / test).
        batch_size_per_image, positive_fraction, fg_iou_threshold, bg_iou_threshold: anchor sampling.
        cls_loss_weight, loc_loss_weight: loss weights.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6"),
        strides: tuple[int, ...] = (4, 8, 16, 32, 64),
        anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        # Inference (and training proposal) parameters
        pre_nms_topk_train: int = 2000,
        pre_nms_topk_test: int = 1000,
        post_nms_topk_train: int = 1000,
        post_nms_topk_test: int = 1000,
        nms_threshold: float = 0.7,
        # Loss parameters
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        fg_iou_threshold: float = 0.7,
        bg_iou_threshold: float = 0.3,
        cls_loss_weight: float = 1.0,
        loc_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not len(in_features) == len(strides) == len(anchor_sizes):
            raise ValueError("in_features, strides and anchor_sizes need one entry per level")
        self.in_features = in_features
        anchors = _StridedAnchorGenerator(
            sizes=tuple((s,) for s in anchor_sizes),
            aspect_ratios=(tuple(aspect_ratios),) * len(anchor_sizes),
            strides=strides,
        )
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(in_channels, len(aspect_ratios)),
            fg_iou_thresh=fg_iou_threshold,
            bg_iou_thresh=bg_iou_threshold,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            pre_nms_top_n={"training": pre_nms_topk_train, "testing": pre_nms_topk_test},
            post_nms_top_n={"training": post_nms_topk_train, "testing": post_nms_topk_test},
            nms_thresh=nms_threshold,
        )
        # torchvision's loss name → (ours, weight)
        self._loss_names = {
            "loss_objectness": ("loss_rpn_cls", cls_loss_weight),
            "loss_rpn_box_reg": ("loss_rpn_loc", loc_loss_weight),
        }

    def forward(
        self,
        features: dict[str, Tensor],
        images: Tensor,
        image_sizes: list[tuple[int, int]],
        targets: list[Instances] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals and, in training, the RPN losses.

        Args:
            features: {"p2": (B, C, Hp/4, Wp/4), ..., "p6": (B, C, Hp/64, Wp/64)}.
            images: (B, 3, Hp, Wp) the padded batch (only its shape is used).
            image_sizes: valid (h, w) per image; proposals are clipped to them.
            targets: ground truth per image (needed in training, ignored in eval).
        Returns:
            per image (R_i, 4) XYXY proposals (no gradient), sorted by decreasing objectness;
            ``{"loss_rpn_cls", "loss_rpn_loc"}`` in training, ``{}`` in eval.
        """
        image_list = ImageList(images, [tuple(s) for s in image_sizes])
        tv_targets = (
            None if targets is None else [{"boxes": t.boxes} for t in targets]
        )  # torchvision's format
        proposals, losses = self.rpn(
            image_list, {k: features[k] for k in self.in_features}, tv_targets
        )
        named = {self._loss_names[k]: v for k, v in losses.items()}
        return proposals, {name: weight * v for (name, weight), v in named.items()}
