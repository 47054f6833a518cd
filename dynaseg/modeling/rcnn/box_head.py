"""Fast R-CNN box branch: proposal sampling, 2-fc head on 7×7 multilevel RoIAlign, losses, inference.

Label conventions, converted only by ``_to_torchvision_labels`` / ``_from_torchvision_labels``:
dynaseg labels are 0..C-1 with sampled background RoIs labelled C (as FCOS's background);
torchvision's ``FastRCNNPredictor`` columns and ``fastrcnn_loss`` labels put background at 0, class c at c+1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import box_iou, remove_small_boxes

from dynaseg.layers.dynamic_shapes import clip_boxes, image_size_tensor
from dynaseg.layers.nms import batched_nms
from dynaseg.layers.roi_align import boxes_to_rois
from dynaseg.modeling.rcnn.pooler import multilevel_roi_align
from dynaseg.structures import Instances

__all__ = [
    "ProposalSamples",
    "BoxInference",
    "sample_proposals",
    "box_losses",
    "BoxDetections",
    "box_inference",
    "BoxHead",
]


def _to_torchvision_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Ours (class c, background C) → torchvision's (background 0, class c at c + 1)."""
    return (labels + 1) % (num_classes + 1)


def _from_torchvision_labels(labels: Tensor) -> Tensor:
    """torchvision's foreground labels 1..C → ours 0..C-1."""
    return labels - 1


class ProposalSamples(NamedTuple):
    """RoIs sampled for the second stage, all images concatenated (per image: positives, then negatives)."""

    rois: Tensor  # (S, 5) [image index, x0, y0, x1, y1], input pixels, no gradient
    labels: Tensor  # (S,) int64 in [0, C]; C = background
    regression_targets: Tensor  # (S, 4) BoxCoder deltas to the matched GT; zeros for background
    gt_index: Tensor  # (S,) int64 matched GT within its image; -1 for background


@torch.no_grad()
def sample_proposals(
    proposals: list[Tensor],
    targets: list[Instances],
    *,
    num_classes: int,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    iou_threshold: float = 0.5,
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
) -> ProposalSamples:
    """Match proposals (plus the GT boxes themselves, as detectron2 does) to GT and sample RoIs.

    IoU ≥ ``iou_threshold`` is foreground, below is background; ``torchvision``'s
    ``BalancedPositiveNegativeSampler`` draws at most ``batch_size_per_image`` RoIs, at most
    ``positive_fraction`` of them foreground. proposals: per image (R_i, 4) XYXY; targets: GT at input size.
    """
    matcher = Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
    sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
    coder = BoxCoder(bbox_reg_weights)
    rois, labels, deltas, gt_index = [], [], [], []
    for props, gt in zip(proposals, targets):
        boxes = torch.cat([props.detach(), gt.boxes.to(props.dtype)])  # (R_i + M_i, 4)
        if len(gt) == 0:
            matched = torch.full((len(boxes),), -1, dtype=torch.int64, device=boxes.device)
        else:
            matched = matcher(box_iou(gt.boxes, boxes))  # (R_i + M_i,) in [-1, M)
        pos, neg = sampler([(matched >= 0).to(torch.int64)])
        keep = torch.cat(
            [pos[0].nonzero().squeeze(1), neg[0].nonzero().squeeze(1)]
        )  # (S_i,) positives first
        index, sampled = matched[keep], boxes[keep]
        fg = (index >= 0).nonzero().squeeze(1)
        labels_i = torch.full_like(index, num_classes)
        labels_i[fg] = gt.labels[index[fg]]
        matched_boxes = sampled.clone()  # background: zero deltas
        matched_boxes[fg] = gt.boxes[index[fg]].to(sampled.dtype)
        rois.append(sampled)
        labels.append(labels_i)
        deltas.append(coder.encode_single(matched_boxes, sampled))
        gt_index.append(index)
    return ProposalSamples(
        rois=boxes_to_rois(rois),
        labels=torch.cat(labels),
        regression_targets=torch.cat(deltas),
        gt_index=torch.cat(gt_index),
    )


def box_losses(
    class_logits: Tensor,
    box_deltas: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    *,
    num_classes: int,
    cls_loss_weight: float = 1.0,
    reg_loss_weight: float = 1.0,
) -> dict[str, Tensor]:
    """torchvision's ``fastrcnn_loss``: cross-entropy over C+1 classes; smooth-L1 (β = 1/9) on the GT
    class's deltas of foreground RoIs, summed and divided by S (so 0 when nothing is foreground).

    class_logits: (S, C+1) torchvision columns; box_deltas: (S, 4(C+1)); labels: (S,) ours; regression_targets: (S, 4).
    """
    cls, reg = fastrcnn_loss(
        class_logits.float(),
        box_deltas.float(),
        [_to_torchvision_labels(labels, num_classes)],
        [regression_targets.float()],
    )
    return {"loss_cls": cls_loss_weight * cls, "loss_box_reg": reg_loss_weight * reg}


class BoxInference(NamedTuple):
    """``box_inference``'s parameters (``**params._asdict()``)."""

    bbox_reg_weights: tuple[float, float, float, float]
    score_threshold: float
    nms_threshold: float
    detections_per_image: int


class BoxDetections(NamedTuple):
    """One image's box-head detections in input pixels, clipped, by decreasing score."""

    boxes: Tensor  # (N, 4) XYXY
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) int64 in 0..C-1


@torch.no_grad()
def box_inference(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: list[Tensor],
    image_sizes: Tensor | list[tuple[int, int]],
    *,
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
    score_threshold: float = 0.05,
    nms_threshold: float = 0.5,
    detections_per_image: int = 100,
) -> list[BoxDetections]:
    """Softmax scores, class-specific decoding, clip, score threshold, per-class NMS, top-k
    (traceable: ONNX export).

    class_logits: (R, C+1), box_deltas: (R, 4(C+1)) for the proposals of all images (per image
    (R_i, 4)); image_sizes: valid (h, w) per image → per image ``BoxDetections`` (labels 0..C-1).
    """
    num_classes = class_logits.shape[1] - 1
    sizes = image_size_tensor(image_sizes, class_logits.device)
    scores = F.softmax(class_logits.float(), dim=1)[:, 1:]  # (R, C), background dropped
    boxes = BoxCoder(bbox_reg_weights).decode_single(
        box_deltas.float(), torch.cat(proposals).float()
    )
    boxes = boxes.reshape(-1, num_classes + 1, 4)[:, 1:]  # (R, C, 4)
    classes = _from_torchvision_labels(torch.arange(1, num_classes + 1, device=scores.device))
    results, start = [], 0
    for props, size in zip(proposals, sizes):
        end = start + props.shape[0]
        s = scores[start:end]
        labels = classes[None, :].expand_as(s).reshape(-1)  # (R_i·C,) row-major
        b, s = clip_boxes(boxes[start:end].reshape(-1, 4), size), s.reshape(-1)  # (R_i·C, ...)
        keep = (s > score_threshold).nonzero().squeeze(1)
        keep = keep[remove_small_boxes(b[keep], 1e-2)]
        nms_kept = batched_nms(
            b[keep], s[keep], labels[keep], nms_threshold, num_groups=num_classes
        )
        keep = keep[nms_kept[:detections_per_image]]
        results.append(BoxDetections(b[keep], s[keep], labels[keep]))
        start = end
    return results


class BoxHead(nn.Module):
    """7×7 multilevel RoIAlign → torchvision ``TwoMLPHead`` → ``FastRCNNPredictor`` (C+1 classes),
    plus its sampling, loss and inference parameters (forwarded to the module-level functions).

    Args:
        in_channels: FPN width. num_classes: C (no background). fc_dim: MLP width.
        pooler_resolution, sampling_ratio: RoIAlign output side and samples per bin (0 = adaptive, detectron2).
        pooler_aligned: half-pixel RoIAlign (detectron2); False as torchvision's Faster / Mask R-CNN.
        batch_size_per_image, positive_fraction, iou_threshold, bbox_reg_weights: training RoI sampling.
        cls_loss_weight, reg_loss_weight: loss weights.
        score_threshold, nms_threshold, detections_per_image: inference.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        fc_dim: int = 1024,
        pooler_resolution: int = 7,
        sampling_ratio: int = 0,
        pooler_aligned: bool = True,
        # Loss parameters
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        cls_loss_weight: float = 1.0,
        reg_loss_weight: float = 1.0,
        # Inference parameters
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pooler_resolution, self.sampling_ratio = pooler_resolution, sampling_ratio
        self.pooler_aligned = pooler_aligned
        self.mlp = TwoMLPHead(in_channels * pooler_resolution**2, fc_dim)
        self.predictor = FastRCNNPredictor(fc_dim, num_classes + 1)
        self.sampling_params = dict(
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            iou_threshold=iou_threshold,
            bbox_reg_weights=tuple(bbox_reg_weights),
        )
        self.loss_weights = dict(cls_loss_weight=cls_loss_weight, reg_loss_weight=reg_loss_weight)
        self.decoding = BoxInference(
            bbox_reg_weights=tuple(bbox_reg_weights),
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            detections_per_image=detections_per_image,
        )

    def forward(self, features: dict[str, Tensor], rois: Tensor) -> tuple[Tensor, Tensor]:
        """rois: (R, 5) → class logits (R, C+1) and deltas (R, 4(C+1)), torchvision column order."""
        x = multilevel_roi_align(
            features,
            rois,
            output_size=self.pooler_resolution,
            sampling_ratio=self.sampling_ratio,
            aligned=self.pooler_aligned,
        )  # (R, F, 7, 7)
        return self.predictor(self.mlp(x))

    def sample(self, proposals: list[Tensor], targets: list[Instances]) -> ProposalSamples:
        return sample_proposals(
            proposals, targets, num_classes=self.num_classes, **self.sampling_params
        )

    def losses(
        self, class_logits: Tensor, box_deltas: Tensor, samples: ProposalSamples
    ) -> dict[str, Tensor]:
        return box_losses(
            class_logits,
            box_deltas,
            samples.labels,
            samples.regression_targets,
            num_classes=self.num_classes,
            **self.loss_weights,
        )

    def inference(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: list[Tensor],
        image_sizes: Tensor | list[tuple[int, int]],
    ) -> list[BoxDetections]:
        return box_inference(
            class_logits, box_deltas, proposals, image_sizes, **self.decoding._asdict()
        )
