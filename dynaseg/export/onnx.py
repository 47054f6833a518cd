"""ONNX export of every dynaseg model, with decoding, NMS and mask prediction in the graph.

Graph contract (one image of any size; names are the ONNX input / output names):

* inputs: ``image`` (1, 3, H, W) float32 RGB 0-255, already resized to the model's test scale and
  zero-padded at the bottom / right to a multiple of ``size_divisibility``; ``image_size`` (2,)
  int64, the valid (h, w) inside the padding.
* outputs, N detections sorted by decreasing score (N dynamic, at most the model's maximum):
  ``boxes`` (N, 4) float32 XYXY in input pixels, clipped to (h, w); ``scores`` (N,) float32;
  ``labels`` (N,) int64 contiguous class ids; ``mask_probs`` (N, R, R) float32 mask probabilities
  covering each box exactly (box-relative, as RoIAlign sampled them).
  Two-stage models (Mask R-CNN, DynaMask) also give ``mask_resolutions`` (N,) int64, the side r_i of
  each mask: its values are ``mask_probs[i, :r_i, :r_i]``, the rest is zero (DynaMask's MSM and size
  policies choose r_i per instance, so R is the largest side, 112). Panoptic DR1Mask also gives
  ``panoptic_columns`` (N, C_F), each detection's dynamic column of the panoptic layer,
  ``panoptic_features`` (C_F, H/4, W/4), the map F they multiply, and ``panoptic_stuff_logits``
  (S, H/4, W/4), the static stuff rows times F.

What stays outside the graph (``dynaseg.export.onnx_runtime``), with the very functions eager
inference uses: the test resize and the padding; rescaling the boxes to the original image,
dropping boxes empty there and pasting the masks (``paste_masks`` in ``blendmask_postprocess`` /
``rcnn_postprocess``); for panoptic models, grouping the detections into instances
(``group_duplicate_detections``), their mean columns (``mean_embeddings_per_instance``) times F
(``panoptic_logits``) after the stuff logits, and ``panoptic_postprocess``.
Pasting stays outside because eager ``paste_masks`` loops over the boxes with Python pixel ranges
and returns N full masks at the *original* image size, which the graph never sees; applying the
same function to the graph's outputs keeps the results identical to eager's.

Exporter: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), whose
torchvision symbolics cover ``roi_align`` (opset >= 16 for ``aligned=True``: RoiAlign with
``coordinate_transformation_mode="half_pixel"``) and ``nms``. NMS is exported here as ONNX
``NonMaxSuppression`` over classes (``_PerClassNMS``), not through torchvision's symbolic, so that
it matches torchvision's ``batched_nms`` exactly (see ``_batched_nms``). DCNv1 (DynaMask's FAM)
exports through the model's own CPU path (``deform_conv2d_sampled``: GridSample + MatMul),
GroupNorm as InstanceNormalization. Opset 16-20; 17 by default. (torch >= 2.9 marks this exporter
deprecated; the torch.export-based one would need the data-dependent shapes below as unbacked
sizes and ONNX translations of torchvision's ops, and is not used.)

Where the graph can differ from eager PyTorch on the CPU: float rounding (onnxruntime's kernels;
measured on the tiny models: boxes < 1e-4 px, scores < 3e-6, mask probabilities < 1e-4); exact
score ties (top-k and NMS order among equal scores); an IoU or a level-assignment ratio within
rounding of its threshold. Eager ``batched_nms`` on CUDA switches algorithm at another size.

Traced pieces. Tracing records tensor operations and bakes every Python value computed from
tensors. These parts of the eager code are not traceable for a dynamic image size / detection
count, and have a traceable counterpart below that runs the same submodules (weights and layers
are never copied):

1. ``normalize_images``: loops over Python image sizes → ``_normalize`` (mask from ``image_size``).
2. ``clip_boxes``: Python-int image size → ``_clip_boxes`` (the ``image_size`` tensor).
3. ``decode_fcos``: ``if rank.numel() > pre_nms_topk`` → ``_decode_fcos`` (k = min(count, top-k) in
   the graph; the same candidates, boxes, scores and location indices).
4. ``torchvision.ops.batched_nms``: picks an algorithm from ``boxes.numel()`` in Python (always
   the coordinate trick while tracing) → ``_batched_nms``, which makes the same choice in the graph.
5. ``conv3x3_at_locations`` (BlendMask attention, DR1Mask embeddings): ``if in_level.any()`` and
   boolean-mask assignment → ``_conv3x3_at_locations`` (the 3×3 patch of each location on every
   level, the right level's product kept with ``where``).
6. ``blend`` has ``if attention.shape[0] == 0`` (a Python branch on N), and onnxruntime fails on
   some empty tensors (a SIGFPE in Einsum, DR1Mask's factored attention; a broadcast error in
   MatMul, DynaMask's deformable convs; -1 in Reshape): the mask heads get one extra all-zero row
   (``_append_zero_row``; DynaMask: a dummy RoI [0, 0, 1, 1]) that is dropped from their output,
   so ``blend``, ``InstancePredictor`` and the DynaMask head run unchanged, never on 0 rows.
7. ``RPN.forward`` (torchvision's ``RegionProposalNetwork.filter_proposals`` clips with
   ``torch.tensor(width)``, a constant once traced, and uses its ``batched_nms``) →
   ``_rpn_proposals`` (the RPN's head, anchor generator and box coder).
8. ``multilevel_roi_align``: ``if index.numel() == 0: continue`` → ``_multilevel_roi_align``.
9. ``box_inference``: ``labels.repeat(len(s))``, Python image size → ``_box_inference``.
10. ``fcn_mask_probs``: ``torch.arange(len(labels))`` → a ``gather`` of the label channel.
11. ``DynaMaskBranch.predict`` / ``DynaMaskHead.forward_early_exit``: Python loop with ``.tolist()``,
    ``break`` and a list of per-instance tensors → ``_dynamask_masks``. The early exit is kept: stage
    s runs only on the RoIs whose chosen side is larger (data-dependent *shapes* via NonZero/Gather,
    no control flow), masks are scattered into (N, 112, 112). Fixed policies (``policy=14`` …
    ``112``) run the stages up to their side only and give (N, r, r).
12. ``DynaMaskHead.lateral_crop`` picks crop-then-project or project-then-crop from Python sizes →
    the export always crops, then projects (``project_first=False``); the two orders are equal up
    to rounding (RoIAlign commutes with a 1×1 conv for boxes inside the image).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import nms as tv_nms
from torchvision.ops import remove_small_boxes

from dynaseg.errors import UserError
from dynaseg.layers.roi_align import boxes_with_batch_index, roi_align_aligned
from dynaseg.modeling.blendmask.blender import blend, pool_bases
from dynaseg.modeling.blendmask.model import BlendMask
from dynaseg.modeling.dr1mask.model import BASIS_STRIDE, DR1Mask
from dynaseg.modeling.dynamask.branch import DynaMaskBranch
from dynaseg.modeling.dynamask.mask_switch import select_resolution
from dynaseg.modeling.fcos.head import FCOSOutputs
from dynaseg.modeling.fcos.locations import compute_locations
from dynaseg.modeling.rcnn.fcn_mask_head import FCNMaskHead
from dynaseg.modeling.rcnn.model import TwoStageDetector
from dynaseg.modeling.rcnn.pooler import assign_levels
from dynaseg.modeling.rcnn.rpn import RPN
from dynaseg.utils.files import atomic_write

__all__ = [
    "export_onnx",
    "export_model",
    "export_module",
    "model_metadata",
    "ExportError",
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "MAX_OPSET",
    "INPUT_NAMES",
    "METADATA_PREFIX",
]

logger = logging.getLogger("dynaseg.export")

DEFAULT_OPSET, MIN_OPSET, MAX_OPSET = 17, 16, 20
INPUT_NAMES = ("image", "image_size")
METADATA_PREFIX = "dynaseg."
FORMAT_VERSION = 1
# torchvision.ops.batched_nms runs one NMS on class-offset boxes up to this many coordinates on the
# CPU (boxes.numel()), and one NMS per class above it.
_TV_BATCHED_NMS_CPU_NUMEL = 4000
_NOT_IN_CLASS = -1.0  # class score of a box that is not of that class (real scores are >= 0)


class ExportError(UserError, ValueError):
    """A model or option the ONNX export does not support; one line for the user."""


# ---------------------------------------------------------------------------------------- helpers


def _topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``values.topk(min(k, len(values)))`` with the minimum taken in the graph (1-D values)."""
    count = torch._shape_as_tensor(values)[0]
    return values.topk(torch.clamp(count, max=k))


def _normalize(image: Tensor, image_size: Tensor, pixel_mean: Tensor, pixel_std: Tensor) -> Tensor:
    """``normalize_images`` for one image: (x - mean) / std, the padding past ``image_size`` set to 0."""
    x = (image - pixel_mean) / pixel_std
    rows = torch.arange(image.shape[-2], device=image.device) < image_size[0]
    cols = torch.arange(image.shape[-1], device=image.device) < image_size[1]
    return x * (rows[:, None] & cols[None, :]).to(x.dtype)


def _clip_boxes(boxes: Tensor, hw: Tensor) -> Tensor:
    """``clip_boxes`` to an image size given as a (2,) float tensor [h, w]."""
    return torch.minimum(boxes.clamp(min=0), hw.flip(0).repeat(2))


def _rois(boxes: Tensor) -> Tensor:
    """(N, 4) boxes of the one image → (N, 5) RoIs [0, x0, y0, x1, y1]."""
    return boxes_with_batch_index(boxes, boxes.new_zeros(boxes.shape[0]))


class _PerClassNMS(torch.autograd.Function):
    """Greedy NMS inside each class, exported as one ONNX ``NonMaxSuppression`` over classes.

    boxes (N, 4) XYXY; class_scores (C, N), the box's score in its class row and ``_NOT_IN_CLASS``
    in the others → (K,) int64 indices of the kept boxes, class by class, by decreasing score in
    each class (``NonMaxSuppression``'s order). Suppression: IoU > ``iou_threshold``, as torchvision.
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


def _batched_nms(
    boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float, num_classes: int
) -> Tensor:
    """``torchvision.ops.batched_nms`` as it runs eagerly on the CPU, traceable.

    torchvision suppresses within each class either by one NMS on boxes shifted apart per class
    (the coordinate trick, up to 1000 boxes) or by one NMS per class (more boxes). Both give the
    same kept set up to the rounding of the shifted coordinates, which is enough to flip an IoU
    sitting at the threshold; so the same choice is made here, in the graph: the shift is applied
    only up to 1000 boxes, and NonMaxSuppression runs per class either way.
    boxes (N, 4), scores (N,), classes (N,) int64 in [0, num_classes) → kept indices by decreasing score.
    """
    count = torch._shape_as_tensor(boxes)[0]
    shift = (count * 4 <= _TV_BATCHED_NMS_CPU_NUMEL).to(boxes.dtype)
    max_coordinate = torch.cat(
        [boxes.flatten(), boxes.new_zeros(1)]
    ).max()  # boxes.max(), safe for N = 0
    offsets = classes.to(boxes.dtype) * (max_coordinate + 1) * shift
    member = torch.arange(num_classes, device=boxes.device)[:, None] == classes[None, :]
    class_scores = torch.where(
        member, scores[None, :], torch.full_like(scores[None, :], _NOT_IN_CLASS)
    )
    keep = _PerClassNMS.apply(boxes + offsets[:, None], class_scores, float(iou_threshold))
    return keep[scores[keep].argsort(descending=True)]


# ---------------------------------------------------------------------------------------- FCOS family


class _Detections(NamedTuple):
    boxes: Tensor  # (N, 4) input pixels, not clipped
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) int64
    location_index: Tensor  # (N,) int64 into the concatenated locations of all levels


def _decode_fcos(
    head: FCOSOutputs,
    strides: list[int],
    num_classes: int,
    *,
    score_threshold: float,
    thresh_with_ctr: bool,
    pre_nms_topk: int,
    nms_threshold: float,
    class_agnostic_nms: bool,
    max_detections: int,
) -> _Detections:
    """``fcos_detections`` + ``decode_fcos`` for image 0 of the batch, traceable."""
    locations = compute_locations(
        [x.shape[-2:] for x in head.cls_logits], strides, head.cls_logits[0].device
    )
    boxes_all, scores_all, labels_all, index_all = [], [], [], []
    offset = 0
    for level, stride in enumerate(strides):
        cls = head.cls_logits[level][0].flatten(1).T  # (HW, C)
        ltrb = head.box_ltrb[level][0].flatten(1).T  # (HW, 4)
        p_cls = cls.float().sigmoid()
        p_ctr = head.centerness[level][0].flatten().float().sigmoid()
        ranking = p_cls * p_ctr[:, None]
        candidates = ((ranking if thresh_with_ctr else p_cls) > score_threshold).flatten()
        flat_index = candidates.nonzero().squeeze(1)
        rank, top = _topk(ranking.flatten()[flat_index], pre_nms_topk)
        flat_index = flat_index[top]
        loc_idx, cls_idx = flat_index // num_classes, flat_index % num_classes
        d = ltrb[loc_idx].float() * stride
        xy = locations[level][loc_idx]
        boxes_all.append(torch.cat([xy - d[:, :2], xy + d[:, 2:]], dim=1))
        scores_all.append(rank.sqrt())
        labels_all.append(cls_idx)
        index_all.append(loc_idx + offset)
        offset = offset + cls.shape[0]
    boxes, scores = torch.cat(boxes_all), torch.cat(scores_all)
    labels, index = torch.cat(labels_all), torch.cat(index_all)
    if class_agnostic_nms:
        keep = _batched_nms(boxes, scores, torch.zeros_like(labels), nms_threshold, 1)[
            :max_detections
        ]
    else:
        keep = _batched_nms(boxes, scores, labels, nms_threshold, num_classes)[:max_detections]
    return _Detections(boxes[keep], scores[keep], labels[keep], index[keep])


def _conv3x3_at_locations(
    features: list[Tensor], weight: Tensor, bias: Tensor | None, location_index: Tensor
) -> Tensor:
    """``conv3x3_at_locations`` for image 0: the dense 3×3 conv at N locations → (N, O)."""
    flat_weight = weight.flatten(1)  # (O, F·9)
    taps = torch.arange(3, device=location_index.device)
    out = None
    offset = 0
    for feat in features:
        h, w = feat.shape[-2:]
        in_level = (location_index >= offset) & (location_index < offset + h * w)
        local = torch.where(in_level, location_index - offset, torch.zeros_like(location_index))
        ys, xs = local // w, local % w
        padded = F.pad(feat[0], (1, 1, 1, 1)).flatten(1)  # (F, (h+2)·(w+2))
        pixel = (ys[:, None, None] + taps[None, :, None]) * (w + 2) + (
            xs[:, None, None] + taps[None, None, :]
        )
        patches = padded.index_select(1, pixel.flatten()).view(padded.shape[0], -1, 9)  # (F, N, 9)
        value = F.linear(patches.permute(1, 0, 2).flatten(1), flat_weight, bias)  # (N, O)
        out = value if out is None else torch.where(in_level[:, None], value, out)
        offset = offset + h * w
    return out


def _append_zero_row(x: Tensor) -> Tensor:
    """x with one more row of zeros along dim 0 (shapes traced)."""
    return torch.cat([x, x.new_zeros((1, *x.shape[1:]))])


class FCOSFamilyExport(nn.Module):
    """BlendMask or DR1Mask (instance or panoptic) inference on one image, traceable."""

    def __init__(self, model: BlendMask | DR1Mask) -> None:
        super().__init__()
        self.model = model
        self.panoptic = isinstance(model, DR1Mask) and model.panoptic_layer is not None

    @property
    def output_names(self) -> tuple[str, ...]:
        panoptic = (
            ("panoptic_columns", "panoptic_features", "panoptic_stuff_logits")
            if self.panoptic
            else ()
        )
        return ("boxes", "scores", "labels", "mask_probs") + panoptic

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            name: {0: "detections"}
            for name in ("boxes", "scores", "labels", "mask_probs", "panoptic_columns")
        } | {
            name: {1: "height_4", 2: "width_4"}
            for name in ("panoptic_features", "panoptic_stuff_logits")
        }

    def forward(self, image: Tensor, image_size: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        x = _normalize(image, image_size, m.pixel_mean, m.pixel_std)
        features = m.backbone(x)
        if isinstance(m, BlendMask):
            levels = m.fcos_levels(features)
        else:
            levels = [features[f"p{i}"] for i in range(3, 3 + len(m.strides))]
        head = m.fcos_head(levels)
        det = _decode_fcos(head, m.strides, m.num_classes, **m.fcos_inference._asdict())
        boxes = _clip_boxes(det.boxes, image_size.to(det.boxes.dtype))
        rois = _rois(boxes)
        if isinstance(m, BlendMask):
            bases = m.basis(m.basis_levels(features))
            pooled = pool_bases(
                bases, rois, resolution=m.resolution, sampling_ratio=m.sampling_ratio
            )
            top = m.attention
            attention = _conv3x3_at_locations(
                head.box_tower, top.conv.weight, top.conv.bias, det.location_index
            )
            attention = attention.view(-1, top.num_bases, top.attention_size, top.attention_size)
            logits = blend(_append_zero_row(pooled), _append_zero_row(attention))[:-1]
            return boxes, det.scores, det.labels, logits.sigmoid()
        context_source = {"box_tower": head.box_tower, "cls_tower": head.cls_tower, "fpn": levels}[
            m.top_layer.context_position
        ]
        basis = m.basis(
            levels,
            m.top_layer.context_factors(context_source),
            output_size=(image.shape[-2] // BASIS_STRIDE, image.shape[-1] // BASIS_STRIDE),
        )
        pooled = pool_bases(
            basis,
            rois,
            resolution=m.resolution,
            sampling_ratio=m.sampling_ratio,
            stride=BASIS_STRIDE,
        )
        embedding_conv = m.top_layer.embedding
        embeddings = _conv3x3_at_locations(
            head.box_tower, embedding_conv.weight, embedding_conv.bias, det.location_index
        )
        logits = m.predictor(_append_zero_row(pooled), _append_zero_row(embeddings))[:-1]
        outputs = (boxes, det.scores, det.labels, logits.sigmoid())
        if self.panoptic:
            features = basis[0]
            stuff_logits = m.panoptic_layer(features, features.new_zeros((1, features.shape[0])))[
                :-1
            ]
            outputs += (m.predictor.panoptic_columns(embeddings), features, stuff_logits)
        return outputs


# ---------------------------------------------------------------------------------------- two-stage


def _rpn_proposals(rpn: RPN, features: dict[str, Tensor], image: Tensor, hw: Tensor) -> Tensor:
    """``RPN.forward`` at inference (torchvision's ``RegionProposalNetwork`` + ``filter_proposals``)
    for one image: (R, 4) proposals by decreasing objectness."""
    net = rpn.rpn
    feats = [features[k] for k in rpn.in_features]
    objectness, deltas = net.head(feats)
    anchors = net.anchor_generator(ImageList(image, [(0, 0)]), feats)[0]  # (A, 4), levels in order
    counts = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = net.box_coder.decode_single(deltas.detach(), anchors)
    objectness = objectness.flatten()
    picked, levels, offset = [], [], 0
    for level, count in enumerate(counts):
        _, top = _topk(objectness[offset : offset + count], net.pre_nms_top_n())
        picked.append(top + offset)
        levels.append(torch.full_like(top, level))
        offset = offset + count
    index, lvl = torch.cat(picked), torch.cat(levels)
    boxes, scores = _clip_boxes(proposals[index], hw), objectness[index].sigmoid()
    keep = remove_small_boxes(boxes, net.min_size)
    boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
    keep = torch.where(scores >= net.score_thresh)[0]
    boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
    keep = _batched_nms(boxes, scores, lvl, net.nms_thresh, len(counts))[: net.post_nms_top_n()]
    return boxes[keep]


def _multilevel_roi_align(
    features: dict[str, Tensor],
    rois: Tensor,
    *,
    output_size: int,
    sampling_ratio: int,
    min_level: int = 2,
    max_level: int = 5,
) -> Tensor:
    """``multilevel_roi_align`` without skipping empty levels (each level pools its RoIs, maybe none)."""
    levels = assign_levels(rois, min_level=min_level, max_level=max_level)
    first = features[f"p{min_level}"]
    out = first.new_zeros((rois.shape[0], first.shape[1], output_size, output_size))
    for k in range(min_level, max_level + 1):
        index = (levels == k).nonzero().squeeze(1)
        pooled = roi_align_aligned(
            features[f"p{k}"],
            rois[index],
            output_size=output_size,
            spatial_scale=2.0**-k,
            sampling_ratio=sampling_ratio,
        )
        out = out.index_put((index,), pooled)
    return out


def _box_inference(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: Tensor,
    hw: Tensor,
    num_classes: int,
    *,
    bbox_reg_weights: tuple[float, float, float, float],
    score_threshold: float,
    nms_threshold: float,
    detections_per_image: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``box_inference`` for one image → boxes (N, 4) clipped, scores (N,), labels (N,)."""
    scores = F.softmax(class_logits.float(), dim=1)[:, 1:]  # (R, C)
    boxes = BoxCoder(bbox_reg_weights).decode_single(box_deltas.float(), proposals.float())
    boxes = _clip_boxes(boxes.reshape(-1, num_classes + 1, 4)[:, 1:].reshape(-1, 4), hw)
    labels = torch.arange(num_classes, device=scores.device)[None, :].expand_as(scores).reshape(-1)
    scores = scores.reshape(-1)
    keep = (scores > score_threshold).nonzero().squeeze(1)
    keep = keep[remove_small_boxes(boxes[keep], 1e-2)]
    keep = keep[
        _batched_nms(boxes[keep], scores[keep], labels[keep], nms_threshold, num_classes)[
            :detections_per_image
        ]
    ]
    return boxes[keep], scores[keep], labels[keep]


def _label_channel(logits: Tensor, labels: Tensor) -> Tensor:
    """(N, C, S, S), (N,) → (N, S, S): each RoI's own class channel."""
    s = logits.shape[-1]
    return logits.gather(1, labels[:, None, None, None].expand(-1, 1, s, s))[:, 0]


def _dynamask_masks(
    branch: DynaMaskBranch,
    features: dict[str, Tensor],
    rois: Tensor,
    labels: Tensor,
    image_size: Tensor,
    policy: str,
) -> tuple[Tensor, Tensor]:
    """``DynaMaskBranch.predict`` with early exit as data-dependent shapes → (mask probs, sides).

    Fixed policies: (N, r, r) at that side. ``msm`` / ``size``: (N, 112, 112) with instance i's
    r_i × r_i probabilities at the top left and zeros elsewhere.
    """
    head = branch.head
    # onnxruntime's MatMul fails on an empty batch (the FAM's deformable convs multiply a 2-D weight
    # by (n, C·9, HW) columns), so one dummy RoI is appended, carried through every stage and dropped.
    real = rois.shape[0]
    rois = torch.cat([rois, rois.new_tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])])
    labels = torch.cat([labels, labels.new_zeros(1)])
    roi_feats = _multilevel_roi_align(features, rois, output_size=head.sides[0], sampling_ratio=0)
    region = head.tiny(roi_feats)
    if policy not in ("msm", "size"):
        k = head.sides.index(int(policy))
        for s in range(k):
            region = head.stage(s, region, features, rois, project_first=False)
        probs = head.mask_logits_at(k, region, labels).sigmoid()[:real]
        return probs, torch.full_like(labels[:real], head.sides[k])
    if policy == "msm":
        choice = select_resolution(branch.msm(roi_feats))
    else:
        choice = branch.size_rule(
            rois, (image_size[0] * image_size[1]).to(torch.float64).sqrt()[None]
        )
    choice = torch.cat(
        [choice[:real], choice.new_full((1,), head.num_resolutions - 1)]
    )  # the dummy goes all the way
    largest = head.sides[-1]
    out = roi_feats.new_zeros((roi_feats.shape[0], largest, largest))
    alive = torch.arange(roi_feats.shape[0], device=rois.device)  # RoI of each row of `region`
    for k, side in enumerate(head.sides):
        alive_choice = choice[alive]
        leaving = (alive_choice == k).nonzero().squeeze(1)
        rows = alive[leaving]
        probs = head.mask_logits_at(k, region[leaving], labels[rows]).sigmoid()
        out = out.index_put((rows,), F.pad(probs, (0, largest - side, 0, largest - side)))
        if k < head.num_resolutions - 1:
            staying = (alive_choice > k).nonzero().squeeze(1)
            alive, region = alive[staying], region[staying]
            region = head.stage(k, region, features, rois[alive], project_first=False)
    sides = torch.tensor(head.sides, dtype=torch.int64, device=rois.device)
    return out[:real], sides[choice[:real]]


class TwoStageExport(nn.Module):
    """Mask R-CNN or DynaMask inference on one image, traceable."""

    output_names = ("boxes", "scores", "labels", "mask_probs", "mask_resolutions")
    dynamic_axes = {name: {0: "detections"} for name in output_names}

    def __init__(self, model: TwoStageDetector) -> None:
        super().__init__()
        branch = model.mask_branch
        if isinstance(branch, DynaMaskBranch):
            if branch.pooler is not None:
                raise ExportError("DynaMask with a custom RoI pooler cannot be exported")
            branch._check_policy(branch.policy)
            if branch.policy == "quota":
                raise ExportError(
                    "DynaMask policy 'quota' (fixed fractions, for benchmarks) cannot be exported; "
                    "use model.dynamask.policy=msm, size or a fixed side"
                )
        elif not isinstance(branch, FCNMaskHead):
            raise ExportError(f"cannot export the mask branch {type(branch).__name__}")
        self.model = model
        self.policy = getattr(branch, "policy", None)

    def forward(self, image: Tensor, image_size: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        hw = image_size.to(torch.float32)
        features = m.backbone(_normalize(image, image_size, m.pixel_mean, m.pixel_std))
        proposals = _rpn_proposals(m.rpn, features, image, hw)
        bh = m.box_head
        roi_feats = _multilevel_roi_align(
            features,
            _rois(proposals),
            output_size=bh.pooler_resolution,
            sampling_ratio=bh.sampling_ratio,
        )
        class_logits, box_deltas = bh.predictor(bh.mlp(roi_feats))
        boxes, scores, labels = _box_inference(
            class_logits, box_deltas, proposals, hw, m.num_classes, **bh.decoding._asdict()
        )
        rois = _rois(boxes)
        branch = m.mask_branch
        if isinstance(branch, FCNMaskHead):
            x = _multilevel_roi_align(
                features,
                rois,
                output_size=branch.pooler_resolution,
                sampling_ratio=branch.sampling_ratio,
            )
            probs = _label_channel(branch.predictor(branch.convs(x)), labels).sigmoid()
            return boxes, scores, labels, probs, torch.full_like(labels, branch.resolution)
        probs, sides = _dynamask_masks(branch, features, rois, labels, image_size, self.policy)
        return boxes, scores, labels, probs, sides


# ---------------------------------------------------------------------------------------- export


def export_module(model: nn.Module) -> FCOSFamilyExport | TwoStageExport:
    """The traceable one-image wrapper of a built dynaseg model (put in eval mode)."""
    model.eval()
    if isinstance(model, (BlendMask, DR1Mask)):
        return FCOSFamilyExport(model).eval()
    if isinstance(model, TwoStageDetector):
        return TwoStageExport(model).eval()
    raise ExportError(f"cannot export a {type(model).__name__}")


def _mask_threshold(model: nn.Module) -> float:
    return float(getattr(model, "mask_threshold", 0.5))


def model_metadata(
    cfg, model: nn.Module, weights_metadata: dict[str, Any] | None = None
) -> dict[str, str]:
    """The ONNX ``metadata_props`` (keys prefixed ``dynaseg.``, values strings, JSON where structured)."""
    from dynaseg.config.overrides import to_dict

    meta = dict(weights_metadata or {})
    num_classes = cfg.model.num_classes
    values = {
        "format_version": FORMAT_VERSION,
        "model_kind": cfg.model.kind,
        "class_names": list(meta.get("class_names") or [f"class_{i}" for i in range(num_classes)]),
        "category_ids": list(meta.get("category_ids") or range(1, num_classes + 1)),
        "stuff_names": list(meta.get("stuff_names") or []),
        "stuff_category_ids": list(meta.get("stuff_category_ids") or []),
        "size_divisibility": cfg.model.size_divisibility,
        "min_size_test": cfg.data.min_size_test,
        "max_size_test": cfg.data.max_size_test,
        "mask_threshold": _mask_threshold(model),
        "mask_policy": getattr(getattr(model, "mask_branch", None), "policy", None),
        "pixel_format": "RGB float32 0-255, (1, 3, H, W) padded bottom/right to size_divisibility",
        "config": to_dict(cfg),
    }
    return {METADATA_PREFIX + k: json.dumps(v) for k, v in values.items()}


def _example_input(cfg) -> tuple[Tensor, Tensor]:
    """A seeded random image at the test scale (4:3), padded: the input the graph is traced with."""
    from dynaseg.data.transforms import resized_shape

    h, w = resized_shape(480, 640, cfg.data.min_size_test, cfg.data.max_size_test)
    from dynaseg.structures import Batch

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=generator) * 255
    batch = Batch.from_images([image], size_divisibility=cfg.model.size_divisibility)
    return batch.images, torch.tensor([h, w], dtype=torch.int64)


def export_model(
    model: nn.Module,
    cfg,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    weights_metadata: dict[str, Any] | None = None,
    example: tuple[Tensor, Tensor] | None = None,
) -> Path:
    """Export a built model (its weights loaded) to ``output`` with metadata; returns the path.

    cfg: the model's ``ExperimentConfig`` (stored in the metadata with the class names, test sizes,
    size divisibility and mask threshold). example: (image, image_size) to trace with (default: a
    random image at the test scale). The file is written atomically.
    """
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset must be in {MIN_OPSET}..{MAX_OPSET} (RoIAlign aligned=True needs 16), got {opset}"
        )
    module = export_module(model.cpu())
    image, image_size = example if example is not None else _example_input(cfg)
    output = Path(output)
    names = module.output_names
    dynamic = {"image": {2: "height", 3: "width"}} | module.dynamic_axes

    def write(tmp: str) -> None:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(
                module,
                (image, image_size),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(names),
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        for w in caught:
            logger.debug("export: %s: %s", w.category.__name__, str(w.message).splitlines()[0])
        proto = onnx.load(tmp)
        onnx.helper.set_model_props(proto, model_metadata(cfg, model, weights_metadata))
        proto.doc_string = (
            f"dynaseg {cfg.model.kind}: see dynaseg/export/onnx.py for the inputs and outputs"
        )
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    atomic_write(output, write)
    return output


def export_onnx(
    cfg, weights: str | Path, output: str | Path, *, opset: int = DEFAULT_OPSET
) -> Path:
    """``dynaseg export --format onnx``: build ``cfg``'s model, load ``weights``, export to ``output``."""
    from dynaseg.engine.checkpoint import load_weights, read_metadata
    from dynaseg.modeling.build import build_model

    model = build_model(cfg.model, pretrained=False)
    load_weights(model, weights)
    return export_model(model, cfg, output, opset=opset, weights_metadata=read_metadata(weights))
