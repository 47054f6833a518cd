"""FCOS as a detector inside a one-stage instance segmenter: targets + losses, and decoding.

BlendMask and DR1Mask share it: both need, besides the FCOS losses, which locations are positive
and which ground-truth instance each one belongs to (their mask branch is supervised there), and
at inference the kept detections with the location each came from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dynaseg.modeling.fcos.head import FCOSOutputs
from dynaseg.modeling.fcos.inference import FCOSDetections, decode_fcos
from dynaseg.modeling.fcos.locations import compute_locations, flatten_levels
from dynaseg.modeling.fcos.losses import fcos_losses, fcos_normalizers, object_balanced_weights
from dynaseg.modeling.fcos.targets import assign_fcos_targets, centerness_target
from dynaseg.structures import Instances

__all__ = [
    "FCOSPositives",
    "FCOSTraining",
    "FCOSInference",
    "fcos_locations",
    "fcos_training",
    "fcos_detections",
]


class FCOSTraining(NamedTuple):
    """FCOS's target and loss parameters (centre sampling radius in strides, focal α and γ, how
    positives are weighted in the classification loss: ``object_balanced_weights``)."""

    center_sampling_radius: float
    focal_alpha: float
    focal_gamma: float
    cls_weighting: str = "location"


class FCOSInference(NamedTuple):
    """FCOS's decoding parameters (``decode_fcos`` takes them as keywords: ``**params._asdict()``)."""

    score_threshold: float
    thresh_with_ctr: bool
    pre_nms_topk: int
    nms_threshold: float
    class_agnostic_nms: bool
    max_detections: int
    clip_before_nms: bool = False


class FCOSPositives(NamedTuple):
    """What the mask branch needs from FCOS's target assignment (P positives in the batch)."""

    losses: dict[str, Tensor]  # loss_fcos_cls, loss_fcos_loc, loss_fcos_ctr
    image_index: Tensor  # (P,) image of each positive
    location_index: Tensor  # (P,) index into that image's concatenated locations
    gt_index: Tensor  # (P,) index into the batch's concatenated ground truth
    ctr_targets: Tensor  # (P,) centerness targets (the mask loss weights)
    ctr_sum_avg: Tensor  # scalar: Σ centerness targets, averaged over ranks


def fcos_locations(
    head: FCOSOutputs,
    strides: list[int],
    size_ranges: list[tuple[float, float]],
    location_offset: float = 0.5,
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Locations of every level: (per-level (R_l, 2), all (R, 2), stride (R,), size range (R, 2))."""
    sizes = [tuple(x.shape[-2:]) for x in head.cls_logits]
    device = head.cls_logits[0].device
    per_level = compute_locations(sizes, strides, device, location_offset)
    counts = [len(p) for p in per_level]
    stride = torch.cat([torch.full((n,), float(s), device=device) for n, s in zip(counts, strides)])
    ranges = torch.cat(
        [torch.tensor([r], device=device).expand(n, 2) for n, r in zip(counts, size_ranges)]
    )
    return per_level, torch.cat(per_level), stride, ranges


def fcos_training(
    head: FCOSOutputs,
    targets: list[Instances],
    *,
    strides: list[int],
    size_ranges: list[tuple[float, float]],
    num_classes: int,
    params: FCOSTraining,
    location_offset: float = 0.5,
) -> FCOSPositives:
    """Assign targets to every location of the batch, compute the FCOS losses, return the positives."""
    _, locations, stride, ranges = fcos_locations(head, strides, size_ranges, location_offset)
    num_loc = locations.shape[0]
    assigned = [
        assign_fcos_targets(
            locations=locations,
            strides=stride,
            size_ranges=ranges,
            gt_boxes=t.boxes,
            gt_labels=t.labels,
            num_classes=num_classes,
            center_sampling_radius=params.center_sampling_radius,
        )
        for t in targets
    ]
    gt_offsets = torch.tensor([0] + [len(t) for t in targets], device=locations.device).cumsum(0)
    labels = torch.cat([t.labels for t in assigned])  # (B·R,)
    positive = (labels != num_classes).nonzero().squeeze(1)  # (P,)
    gt_index = torch.cat([t.gt_inds + off for t, off in zip(assigned, gt_offsets)])[positive]
    box_targets = torch.cat([t.box_ltrb for t in assigned])[positive]
    ctr_targets = centerness_target(box_targets)
    num_pos_avg, ctr_sum_avg = fcos_normalizers(
        torch.tensor(float(len(positive)), device=labels.device), ctr_targets
    )
    losses = fcos_losses(
        cls_logits=flatten_levels(head.cls_logits).reshape(-1, num_classes),
        box_ltrb=flatten_levels(head.box_ltrb).reshape(-1, 4)[positive],
        centerness=flatten_levels(head.centerness).reshape(-1)[positive],
        labels=labels,
        box_targets=box_targets,
        ctr_targets=ctr_targets,
        num_pos_avg=num_pos_avg,
        ctr_sum_avg=ctr_sum_avg,
        focal_alpha=params.focal_alpha,
        focal_gamma=params.focal_gamma,
        positive_weights=(
            object_balanced_weights(gt_index) if params.cls_weighting == "object" else None
        ),
    )
    return FCOSPositives(
        losses=losses,
        image_index=positive // num_loc,
        location_index=positive % num_loc,
        gt_index=gt_index,
        ctr_targets=ctr_targets,
        ctr_sum_avg=ctr_sum_avg,
    )


def fcos_detections(
    head: FCOSOutputs,
    *,
    strides: list[int],
    params: FCOSInference,
    location_offset: float = 0.5,
    image_sizes: Tensor | None = None,
) -> list[FCOSDetections]:
    """Decode every image of the batch (network-input pixels; boxes clipped to ``image_sizes``
    (B, 2) before NMS only with ``params.clip_before_nms``)."""
    sizes = [x.shape[-2:] for x in head.cls_logits]
    per_level = compute_locations(sizes, strides, head.cls_logits[0].device, location_offset)
    return [
        decode_fcos(
            cls_logits=[x[i].flatten(1).T for x in head.cls_logits],
            box_ltrb=[x[i].flatten(1).T for x in head.box_ltrb],
            centerness=[x[i].flatten() for x in head.centerness],
            locations=per_level,
            strides=strides,
            image_size=None if image_sizes is None else image_sizes[i],
            **params._asdict(),
        )
        for i in range(head.cls_logits[0].shape[0])
    ]
