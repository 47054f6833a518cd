"""DR1Mask's unified panoptic layer (paper §3.3, Eq. 9) and its targets, loss and post-processing.

A single 1×1 convolution on the shared map F (C_F channels) whose weight matrix is
W = [W_stuff; W_thing]: the first S rows are static (one per stuff class), the remaining rows are
dynamic, one per instance: the mean ē_j of the panoptic embeddings of the predictions assigned to
instance j. The logits are one matrix product Y = W F, (S + N) maps; argmax over them is the
panoptic map. In training, N is the number of ground-truth instances with at least one positive
location; at inference, the detections are grouped into instances (duplicates of one object, of
any class, join the best-scoring one) and each group's mean embedding is a row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_iou, nms

from dynaseg.structures import Instances
from dynaseg.structures.panoptic import IGNORE_LABEL, PanopticSegmentation, Segment

__all__ = [
    "PanopticLayer",
    "group_duplicate_detections",
    "mean_embeddings_per_instance",
    "panoptic_logits",
    "panoptic_targets",
    "panoptic_loss",
    "panoptic_postprocess",
]


class PanopticLayer(nn.Module):
    """The static stuff rows W_stuff (S, C_F) of the panoptic 1×1 conv (no bias).

    Args: channels: C_F. num_stuff_classes: S.
    """

    def __init__(self, *, channels: int, num_stuff_classes: int) -> None:
        super().__init__()
        self.stuff_weight = nn.Parameter(torch.empty(num_stuff_classes, channels))
        nn.init.normal_(self.stuff_weight, std=0.01)

    def forward(self, features: Tensor, thing_weights: Tensor) -> Tensor:
        """features: (C_F, h, w) of one image; thing_weights: (N, C_F) → logits (S + N, h, w)."""
        return panoptic_logits(features, self.stuff_weight, thing_weights)


def panoptic_logits(features: Tensor, stuff_weight: Tensor, thing_weights: Tensor) -> Tensor:
    """Eq. 9: Y = [W_stuff; W_thing] F. features (C, h, w); stuff (S, C); things (N, C) → (S + N, h, w)."""
    c, h, w = features.shape
    weight = torch.cat([stuff_weight, thing_weights.to(stuff_weight.dtype)], dim=0)
    return (weight @ features.reshape(c, h * w)).view(-1, h, w)


@torch.no_grad()
def group_duplicate_detections(
    boxes: Tensor, scores: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor]:
    """Test-time instances: detections that cover the same object, whatever their class, form one group.

    Class-agnostic NMS keeps the highest-scoring detection of each object; every detection then
    joins the kept one it overlaps most, if that IoU exceeds ``iou_threshold`` (else it is dropped).
    boxes: (N, 4); scores: (N,) → (kept (K,) indices, group (N,) in [0, K) or -1).
    """
    kept = nms(boxes, scores, iou_threshold)
    if kept.numel() == 0:
        return kept, torch.full_like(scores, -1, dtype=torch.long)
    iou, group = box_iou(boxes[kept], boxes).max(dim=0)
    group = torch.where(iou > iou_threshold, group, torch.full_like(group, -1))
    group[kept] = torch.arange(len(kept), device=kept.device)
    return kept, group


def mean_embeddings_per_instance(
    embeddings: Tensor, instance_index: Tensor, num_instances: int
) -> tuple[Tensor, Tensor]:
    """ē_j = mean of the embeddings assigned to instance j.

    embeddings: (P, C); instance_index: (P,) in [0, num_instances) → (means (J, C) of the J
    instances that have any, present (num_instances,) bool).
    """
    counts = torch.bincount(instance_index, minlength=num_instances)
    sums = embeddings.new_zeros((num_instances, embeddings.shape[1])).index_add(
        0, instance_index, embeddings
    )
    present = counts > 0
    return sums[present] / counts[present, None].to(embeddings.dtype), present


@torch.no_grad()
def panoptic_targets(
    sem_seg: Tensor, masks: Tensor, present: Tensor, num_stuff: int, stride: int
) -> Tensor:
    """Per-pixel class of the panoptic logits, sampled at the centres of stride-``stride`` cells.

    sem_seg: (Hp, Wp) int64, stuff id or IGNORE_LABEL (void, crowd, things); masks: (G, h, w) bool
    instances at the image's size; present: (G,) which instances have a row (their pixels get
    num_stuff + rank among present ones; the others stay ignored) → (Hp/stride, Wp/stride) int64.
    """
    target = sem_seg.clone()
    h, w = masks.shape[-2:]
    for row, g in enumerate(present.nonzero().squeeze(1).tolist()):
        target[:h, :w][masks[g]] = num_stuff + row
    return target[stride // 2 :: stride, stride // 2 :: stride]


def panoptic_loss(logits: list[Tensor], targets: list[Tensor], weight: float) -> Tensor:
    """weight · softmax cross-entropy over each image's S + N_b maps, averaged over all labelled pixels.

    logits: per image (S + N_b, h, w); targets: per image (h', w') with h' ≥ h (cropped) → scalar.
    """
    total, count = logits[0].new_zeros(()).float(), 0
    for lg, tg in zip(logits, targets):
        tg = tg[: lg.shape[-2], : lg.shape[-1]]
        valid = tg != IGNORE_LABEL
        if valid.any():
            total = total + F.cross_entropy(
                lg.float()[None], tg[None], ignore_index=IGNORE_LABEL, reduction="sum"
            )
            count += int(valid.sum())
    if count == 0:
        return sum(lg.sum() for lg in logits) * 0.0
    return weight * total / count


@torch.no_grad()
def _upsampled_argmax(
    logits: Tensor,
    *,
    stride: int,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    boxes: Tensor | None,
    num_stuff: int,
    chunk: int = 16,
) -> Tensor:
    """argmax over the logits upsampled (bilinear ×stride, cropped to the input, resized to the output).

    Channels go in chunks with a running maximum, so memory stays O(H·W) for any number of maps.
    ``boxes`` (N, 4) at ``output_size``: thing map j counts only inside box j (None: everywhere).
    logits: (S + N, h, w) → (H, W) int64 channel index.
    """
    hp, wp = logits.shape[-2] * stride, logits.shape[-1] * stride
    best_value = best_index = None
    ys = torch.arange(output_size[0], device=logits.device)[:, None]
    xs = torch.arange(output_size[1], device=logits.device)[None, :]
    for start in range(0, logits.shape[0], chunk):
        part = F.interpolate(
            logits[None, start : start + chunk].float(),
            size=(hp, wp),
            mode="bilinear",
            align_corners=False,
        )[..., : input_size[0], : input_size[1]]
        part = F.interpolate(part, size=output_size, mode="bilinear", align_corners=False)[0]
        if boxes is not None:
            for c in range(part.shape[0]):
                j = start + c - num_stuff
                if j >= 0:
                    x0, y0, x1, y1 = boxes[j].tolist()
                    inside = (
                        (xs + 0.5 >= x0) & (xs + 0.5 <= x1) & (ys + 0.5 >= y0) & (ys + 0.5 <= y1)
                    )
                    part[c].masked_fill_(~inside, float("-inf"))
        value, index = part.max(dim=0)
        if best_value is None:
            best_value, best_index = value, index
        else:
            better = value > best_value
            best_value = torch.where(better, value, best_value)
            best_index = torch.where(better, index + start, best_index)
    return best_index


@torch.no_grad()
def panoptic_postprocess(
    logits: Tensor,
    instances: Instances,
    *,
    num_stuff: int,
    stride: int,
    input_size: tuple[int, int],
    min_stuff_area: int = 0,
    restrict_to_boxes: bool = False,
) -> PanopticSegmentation:
    """The panoptic map of one image from its (S + N) logits.

    logits: (S + N, Hp/stride, Wp/stride); instances: the N detections whose embeddings made the
    thing rows, at the output size (boxes, labels, scores, masks) → PanopticSegmentation at
    ``instances.image_size``: stuff segments (label = stuff id, score 1) with at least
    ``min_stuff_area`` pixels (smaller ones become void), then one segment per detection that won
    any pixel (label and score of the detection). ``restrict_to_boxes`` limits each thing map to its box.
    """
    output_size = instances.image_size
    winner = _upsampled_argmax(
        logits,
        stride=stride,
        input_size=input_size,
        output_size=output_size,
        boxes=instances.boxes if restrict_to_boxes else None,
        num_stuff=num_stuff,
    )
    areas = torch.bincount(winner.flatten(), minlength=logits.shape[0]).tolist()
    ids = torch.zeros(output_size, dtype=torch.int32, device=logits.device)
    segments: list[Segment] = []
    for c, area in enumerate(areas):
        isthing = c >= num_stuff
        if area == 0 or (not isthing and area < min_stuff_area):
            continue
        seg_id = len(segments) + 1
        ids[winner == c] = seg_id
        if isthing:
            j = c - num_stuff
            segments.append(
                Segment(
                    id=seg_id,
                    label=int(instances.labels[j]),
                    isthing=True,
                    score=float(instances.scores[j]),
                    area=area,
                )
            )
        else:
            segments.append(Segment(id=seg_id, label=c, isthing=False, score=1.0, area=area))
    return PanopticSegmentation(ids=ids, segments=segments, instances=instances)
