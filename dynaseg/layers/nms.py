"""Class-aware NMS: torchvision's ``batched_nms`` eagerly, and the same decisions inside a trace.

torchvision's ``batched_nms`` chooses its algorithm in Python from ``boxes.numel()``: on the CPU one
NMS over boxes shifted apart per class up to 1000 boxes, one NMS per class above. A trace would
bake the choice made on the example input, and the shifted coordinates round differently from the
unshifted ones (enough to flip an IoU sitting at the threshold). While tracing, ``batched_nms``
therefore makes the same choice in the graph and suppresses with ONNX ``NonMaxSuppression`` over
classes (``_PerClassNMS``), which is the one export-only piece here: torchvision's ``nms``
symbolic has no per-class form.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms as tv_nms

__all__ = ["batched_nms"]

# torchvision.ops.batched_nms uses the coordinate trick on the CPU up to this many coordinates.
_TV_COORDINATE_TRICK_NUMEL = 4000
_NOT_IN_CLASS = -1.0  # class score of a box outside that class (real scores are >= 0)


def batched_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, *, num_groups: int
) -> Tensor:
    """Greedy NMS inside each group: boxes (N, 4) XYXY, scores (N,) ≥ 0, groups (N,) int64 in
    [0, num_groups) → kept indices (K,) by decreasing score; suppression at IoU > ``iou_threshold``.
    """
    if not torch.jit.is_tracing():
        return tv_batched_nms(boxes, scores, groups, iou_threshold)
    count = torch._shape_as_tensor(boxes)[0]
    shift = (count * 4 <= _TV_COORDINATE_TRICK_NUMEL).to(boxes.dtype)
    max_coordinate = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()  # safe for N = 0
    offsets = groups.to(boxes.dtype) * (max_coordinate + 1) * shift
    member = torch.arange(num_groups, device=boxes.device)[:, None] == groups[None, :]
    class_scores = torch.where(
        member, scores[None, :], torch.full_like(scores[None], _NOT_IN_CLASS)
    )
    keep = _PerClassNMS.apply(boxes + offsets[:, None], class_scores, float(iou_threshold))
    return keep[scores[keep].argsort(descending=True)]


class _PerClassNMS(torch.autograd.Function):
    """NMS inside each class, exported as one ONNX ``NonMaxSuppression`` over classes.

    boxes (N, 4); class_scores (C, N): the box's score in its class row, ``_NOT_IN_CLASS`` in the
    others → (K,) int64 kept indices, class by class, by decreasing score within a class.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, class_scores: Tensor, iou_threshold: float) -> Tensor:  # type: ignore[override]
        kept = [torch.zeros((0,), dtype=torch.int64, device=boxes.device)]
        for scores in class_scores:
            index = (scores > _NOT_IN_CLASS / 2).nonzero().squeeze(1)
            kept.append(index[tv_nms(boxes[index], scores[index], iou_threshold)])
        return torch.cat(kept)

    @staticmethod
    def symbolic(g, boxes, class_scores, iou_threshold: float):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        selected = g.op(
            "NonMaxSuppression",
            g.op("Unsqueeze", boxes, const([0], torch.int64)),
            g.op("Unsqueeze", class_scores, const([0], torch.int64)),
            const([2**62], torch.int64),
            const([iou_threshold], torch.float32),
            const([_NOT_IN_CLASS / 2], torch.float32),
        )  # (K, 3) [batch, class, box]
        return g.op("Gather", selected, const(2, torch.int64), axis_i=1)
