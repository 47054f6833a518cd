"""One-stage models' paste-back: per-image split of the batch's rows, rescale, paste."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from dynaseg.modeling.fcos.inference import FCOSDetections
from dynaseg.structures import Instances
from dynaseg.structures.detections import RawDetections
from dynaseg.structures.masks import paste_masks, scale_boxes

__all__ = ["nonempty_boxes", "split_per_image", "one_stage_postprocess"]


def nonempty_boxes(boxes: Tensor) -> Tensor:
    """(N, 4) XYXY → (N,) bool: positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def split_per_image(
    boxes: Tensor, mask_probs: Tensor, detections: list[FCOSDetections]
) -> list[RawDetections]:
    """Rows of all images (in image order) → per image ``RawDetections`` (one mask side R)."""
    out, start = [], 0
    for d in detections:
        end = start + d.labels.shape[0]
        sides = torch.full_like(d.labels, mask_probs.shape[-1])
        out.append(
            RawDetections(boxes[start:end], d.scores, d.labels, mask_probs[start:end], sides)
        )
        start = end
    return out


def one_stage_postprocess(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    mask_probs: Tensor,
    *,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_threshold: float,
) -> Instances:
    """Rescale one image's detections to its original size and paste the masks.

    boxes: (N, 4) clipped to ``input_size``; mask_probs: (N, R, R) → Instances with (N', H, W) bool
    masks at ``output_size`` (boxes empty after rescaling are dropped).
    """
    boxes = clip_boxes_to_image(scale_boxes(boxes, input_size, output_size), output_size)
    keep = nonempty_boxes(boxes)
    boxes, scores, labels, mask_probs = boxes[keep], scores[keep], labels[keep], mask_probs[keep]
    masks = paste_masks(mask_probs, boxes, output_size, mask_threshold)
    return Instances(image_size=output_size, boxes=boxes, labels=labels, scores=scores, masks=masks)
