"""Region Proposal Network: torchvision's RPN components behind our (features, images, Instances) interface."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.ops import remove_small_boxes

from dynaseg.layers.dynamic_shapes import clip_boxes, image_size_tensor, topk_at_most
from dynaseg.layers.nms import batched_nms
from dynaseg.structures import Instances

__all__ = ["RPN", "filter_proposals"]


class _StridedAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with the FPN strides given instead of inferred.

    torchvision infers a level's stride as ``padded_size // grid_size``, which is wrong for P6 whenever
    Hp/32 is odd (Hp = 96: P5 has 3 rows, P6 has 2, inferred stride 48 instead of 64).
    ``round_anchors=False`` keeps the cell anchors' half-sides unrounded, as detectron2 does
    (torchvision rounds them to whole pixels: 22.63 → 23 for a 32² anchor of ratio 0.5).
    """

    def __init__(
        self,
        *,
        sizes: tuple[tuple[int, ...], ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
        strides: tuple[int, ...],
        round_anchors: bool = True,
    ) -> None:
        object.__setattr__(self, "round_anchors", round_anchors)  # read by the base's __init__
        super().__init__(sizes, aspect_ratios)
        self.strides = strides

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None) -> Tensor:
        if self.round_anchors:
            return super().generate_anchors(scales, aspect_ratios, dtype=dtype, device=device)
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device).sqrt()
        ws = (scales[None, :] / h_ratios[:, None]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

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
        infer_anchor_strides: torchvision's ``AnchorGenerator`` (stride = padded size // grid size,
            off for P6 when Hp/32 is odd) instead of the given strides; reproduces torchvision's models.
        round_anchors: cell anchors rounded to whole pixels (torchvision); False: detectron2's.
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
        infer_anchor_strides: bool = False,
        round_anchors: bool = True,
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
        sizes, ratios = (
            tuple((s,) for s in anchor_sizes),
            (tuple(aspect_ratios),) * len(anchor_sizes),
        )
        anchors = (
            AnchorGenerator(sizes, ratios)
            if infer_anchor_strides
            else _StridedAnchorGenerator(
                sizes=sizes, aspect_ratios=ratios, strides=strides, round_anchors=round_anchors
            )
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
        image_sizes: Tensor | list[tuple[int, int]],
        targets: list[Instances] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals and, in training, the RPN losses (torchvision's ``RegionProposalNetwork.forward``
        with ``filter_proposals`` below, which a trace keeps dynamic).

        Args:
            features: {"p2": (B, C, Hp/4, Wp/4), ..., "p6": (B, C, Hp/64, Wp/64)}.
            images: (B, 3, Hp, Wp) the padded batch (only its shape is used).
            image_sizes: valid (h, w) per image; proposals are clipped to them.
            targets: ground truth per image (needed in training, ignored in eval).
        Returns:
            per image (R_i, 4) XYXY proposals (no gradient), sorted by decreasing objectness;
            ``{"loss_rpn_cls", "loss_rpn_loc"}`` in training, ``{}`` in eval.
        """
        net = self.rpn
        sizes = image_size_tensor(image_sizes, images.device)
        feats = [features[k] for k in self.in_features]
        objectness, deltas = net.head(feats)
        anchors = net.anchor_generator(ImageList(images, [(0, 0)] * len(sizes)), feats)
        counts = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # (B·A, 1), (B·A, 4)
        # Decoded in float32: bf16 deltas (autocast) would put proposals on a 1–2 px grid at 128–512 px.
        proposals = net.box_coder.decode(deltas.detach().float(), anchors).view(len(sizes), -1, 4)
        scores = objectness.detach().view(len(sizes), -1)
        boxes = [
            filter_proposals(
                p,
                s,
                size,
                counts,
                pre_nms_topk=net.pre_nms_top_n(),
                post_nms_topk=net.post_nms_top_n(),
                min_size=net.min_size,
                score_threshold=net.score_thresh,
                nms_threshold=net.nms_thresh,
            )
            for p, s, size in zip(proposals, scores, sizes)
        ]
        if not self.training:
            return boxes, {}
        if targets is None:
            raise ValueError("RPN training needs targets")
        labels, matched = net.assign_targets_to_anchors(
            anchors, [{"boxes": t.boxes} for t in targets]
        )
        cls, loc = net.compute_loss(
            objectness, deltas, labels, net.box_coder.encode(matched, anchors)
        )
        (cls_name, cls_weight), (loc_name, loc_weight) = (
            self._loss_names["loss_objectness"],
            self._loss_names["loss_rpn_box_reg"],
        )
        return boxes, {cls_name: cls_weight * cls, loc_name: loc_weight * loc}


def filter_proposals(
    proposals: Tensor,
    objectness: Tensor,
    image_size: Tensor,
    counts: list[int],
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_size: float,
    score_threshold: float,
    nms_threshold: float,
) -> Tensor:
    """One image's proposals as torchvision's ``RegionProposalNetwork.filter_proposals`` keeps them:
    top-k objectness per level, clip, drop small and low-scoring boxes, NMS per level, top-k.

    proposals: (A, 4) decoded anchors, levels in order (``counts`` anchors each); objectness: (A,)
    logits; image_size: (2,) [h, w] → (R, 4) by decreasing objectness.
    """
    picked, levels, offset = [], [], 0
    for level, count in enumerate(counts):
        _, top = topk_at_most(objectness[offset : offset + count], pre_nms_topk)
        picked.append(top + offset)
        levels.append(torch.full_like(top, level))
        offset = offset + count
    index, level = torch.cat(picked), torch.cat(levels)
    boxes, scores = clip_boxes(proposals[index], image_size), objectness[index].sigmoid()
    keep = remove_small_boxes(boxes, min_size)
    boxes, scores, level = boxes[keep], scores[keep], level[keep]
    keep = torch.where(scores >= score_threshold)[0]
    boxes, scores, level = boxes[keep], scores[keep], level[keep]
    keep = batched_nms(boxes, scores, level, nms_threshold, num_groups=len(counts))
    return boxes[keep[:post_nms_topk]]
