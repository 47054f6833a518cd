"""FCOS decoding: threshold, per-level top-k, class-aware NMS, top-N (traceable for export)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dynaseg.layers.dynamic_shapes import clip_boxes, topk_at_most
from dynaseg.layers.nms import batched_nms

__all__ = ["FCOSDetections", "decode_fcos"]


class FCOSDetections(NamedTuple):
    """Detections of one image, in network-input pixel coordinates (not clipped)."""

    boxes: Tensor  # (N, 4) XYXY
    scores: Tensor  # (N,) sqrt(p_cls · p_ctr)
    labels: Tensor  # (N,) int64
    location_index: Tensor  # (N,) int64 index into the image's concatenated locations (all levels)


def decode_fcos(
    *,
    cls_logits: list[Tensor],
    box_ltrb: list[Tensor],
    centerness: list[Tensor],
    locations: list[Tensor],
    strides: list[int],
    score_threshold: float,
    thresh_with_ctr: bool,
    pre_nms_topk: int,
    nms_threshold: float,
    max_detections: int,
    class_agnostic_nms: bool = False,
    clip_before_nms: bool = False,
    image_size: Tensor | None = None,
) -> FCOSDetections:
    """Decode one image's head outputs.

    Args (per level l, one image):
        cls_logits: (H_l·W_l, C). box_ltrb: (H_l·W_l, 4) stride units. centerness: (H_l·W_l,) logits.
        locations: (H_l·W_l, 2) (x, y).
        class_agnostic_nms: one NMS over all classes (FCOS's sigmoid classifier can keep several
            classes on one object; AdelaiDet's NMS is per class).
        clip_before_nms: clip the boxes to ``image_size`` ((2,) [h, w]) before NMS, as
            torchvision's FCOS does (otherwise they are returned unclipped).
    """
    boxes_all, scores_all, labels_all, index_all = [], [], [], []
    offset = 0
    num_classes = cls_logits[0].shape[1]
    for cls, ltrb, ctr, loc, stride in zip(cls_logits, box_ltrb, centerness, locations, strides):
        p_cls = cls.float().sigmoid()
        p_ctr = ctr.float().sigmoid()
        ranking = p_cls * p_ctr[:, None]  # (HW, C)
        candidates = ((ranking if thresh_with_ctr else p_cls) > score_threshold).flatten()
        flat_index = candidates.nonzero().squeeze(1)  # row-major (location, class)
        rank, top = topk_at_most(ranking.flatten()[flat_index], pre_nms_topk)
        flat_index = flat_index[top]
        loc_idx, cls_idx = flat_index // num_classes, flat_index % num_classes
        d = ltrb[loc_idx].float() * stride
        xy = loc[loc_idx]
        boxes_all.append(torch.cat([xy - d[:, :2], xy + d[:, 2:]], dim=1))
        scores_all.append(rank.sqrt())
        labels_all.append(cls_idx)
        index_all.append(loc_idx + offset)
        offset = offset + cls.shape[0]
    boxes, scores = torch.cat(boxes_all), torch.cat(scores_all)
    labels, index = torch.cat(labels_all), torch.cat(index_all)
    if clip_before_nms and image_size is not None:
        boxes = clip_boxes(boxes, image_size)
    if class_agnostic_nms:
        keep = batched_nms(boxes, scores, torch.zeros_like(labels), nms_threshold, num_groups=1)
    else:
        keep = batched_nms(boxes, scores, labels, nms_threshold, num_groups=num_classes)
    keep = keep[:max_detections]  # sorted by score
    return FCOSDetections(boxes[keep], scores[keep], labels[keep], index[keep])
