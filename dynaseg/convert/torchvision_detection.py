"""torchvision's detection checkpoints → our models, tensor by tensor (``dynaseg convert``).

``maskrcnn_resnet50_fpn`` maps onto our two-stage Mask R-CNN exactly: the backbone, FPN, RPN head,
box head and mask head are torchvision's own modules inside ours, so only the prefixes and the class
rows change. With the ``mask_rcnn_r50_fpn_torchvision`` preset (RoIAlign without the half-pixel
offset, 2 samples per bin in the box pooler, torchvision's anchor strides) the converted model
gives torchvision's boxes, scores and labels (``tests/unit/convert``).

``fcos_resnet50_fpn`` maps onto the FCOS part of BlendMask or DR1Mask (backbone, FPN with P6 / P7
from P5, the two towers of [conv, GroupNorm, ReLU] × 4, the three predictors); the rest of the
model (bases, attention, ...) keeps its initialisation and is reported, to be trained next
(``model.init_from``). Its switches: locations at cell corners (``model.fcos.location_offset=0``),
boxes clipped before NMS, and its score threshold 0.2 on √(p_cls·p_ctr) = ours 0.04 on the product.

Class rows: torchvision's heads have a background row 0 and one row per label; ours have C rows
(the box predictor keeps torchvision's background column; FCOS's sigmoid classifier has none). A
checkpoint with C + 1 rows maps label c + 1 → our class c; the COCO checkpoints (91 rows: COCO
category ids, 11 of them unused) map onto an 80-class model through the COCO category ids.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dynaseg.convert.mapping import ConversionError, raise_unless_complete

__all__ = [
    "ConversionError",
    "TORCHVISION_MODELS",
    "UNSUPPORTED",
    "convert_torchvision",
    "coco_ids",
]


class _Spec(NamedTuple):
    """How one torchvision model maps: key prefixes, the tensor whose rows are the classes, and the
    prefixes of ours the checkpoint must cover (None: all of the model)."""

    prefixes: tuple[tuple[str, str], ...]
    classes_key: str
    covers: tuple[str, ...] | None
    overrides: tuple[str, ...]  # config switches that reproduce the model


TORCHVISION_MODELS: dict[str, _Spec] = {
    "maskrcnn_resnet50_fpn": _Spec(
        prefixes=(
            ("backbone.body.", "backbone.body."),
            ("backbone.fpn.", "backbone.fpn."),
            ("rpn.head.", "rpn.rpn.head."),
            ("roi_heads.box_head.", "box_head.mlp."),
            ("roi_heads.box_predictor.", "box_head.predictor."),
            ("roi_heads.mask_head.", "mask_branch.convs."),
            ("roi_heads.mask_predictor.", "mask_branch.predictor."),
        ),
        classes_key="roi_heads.box_predictor.cls_score.bias",
        covers=None,
        overrides=(),
    ),
    "fcos_resnet50_fpn": _Spec(
        prefixes=(
            ("backbone.body.", "backbone.body."),
            ("backbone.fpn.", "backbone.fpn."),
            ("head.classification_head.conv.", "fcos_head.cls_tower."),
            ("head.classification_head.cls_logits.", "fcos_head.cls_logits."),
            ("head.regression_head.conv.", "fcos_head.box_tower."),
            ("head.regression_head.bbox_reg.", "fcos_head.bbox_pred."),
            ("head.regression_head.bbox_ctrness.", "fcos_head.ctrness."),
        ),
        classes_key="head.classification_head.cls_logits.bias",
        covers=(
            "backbone.",
            "fcos_head.cls_tower.",
            "fcos_head.box_tower.",
            "fcos_head.cls_logits",
            "fcos_head.bbox_pred",
            "fcos_head.ctrness",
        ),
        overrides=(
            "model.fcos.location_offset=0",
            "model.fcos.clip_before_nms=true",
            "model.fcos.score_threshold=0.04",
            "model.fcos.thresh_with_ctr=true",
        ),
    ),
}

# Models our layers cannot express, and the layer that differs.
UNSUPPORTED = {
    "maskrcnn_resnet50_fpn_v2": "its RPN head has two 3×3 convs and its box head is four 3×3 convs "
    "with BatchNorm and one fc (FastRCNNConvFCHead); ours are torchvision's one-conv RPNHead and "
    "TwoMLPHead",
    "fasterrcnn_resnet50_fpn": "it has no mask head (dynaseg's two-stage models segment)",
}


def coco_ids(categories: list[str]) -> list[int]:
    """Label indices of the real classes in torchvision's 91-entry COCO list (not background or N/A)."""
    return [i for i, name in enumerate(categories) if name not in ("__background__", "N/A")]


def _rows(num_rows: int, num_classes: int, coco_labels: list[int]) -> list[int]:
    """torchvision label (row) of each of our classes."""
    if num_rows == num_classes + 1:
        return list(range(1, num_classes + 1))
    if num_rows == 91 and num_classes == len(coco_labels) == 80:
        return coco_labels
    raise ConversionError(
        f"the checkpoint has {num_rows} class rows ({num_rows - 1} classes and background); "
        f"the config has model.num_classes={num_classes}: set model.num_classes={num_rows - 1}"
        + (" (or 80 for COCO's classes)" if num_rows == 91 else "")
    )


def _rename(key: str, prefixes: tuple[tuple[str, str], ...]) -> str | None:
    """Our name of a torchvision tensor, or None when no prefix maps it. FCOS towers: torchvision's
    Sequential index 3i (conv) / 3i + 1 (GroupNorm) → our ``convs[i]`` / ``norms[i][0]``."""
    name = next(
        (ours + key[len(theirs) :] for theirs, ours in prefixes if key.startswith(theirs)), None
    )
    if name is not None and (m := re.fullmatch(r"fcos_head\.(cls|box)_tower\.(\d+)\.(\w+)", name)):
        index = int(m[2])
        part = f"convs.{index // 3}" if index % 3 == 0 else f"norms.{index // 3}.0"
        return f"fcos_head.{m[1]}_tower.{part}.{m[3]}"
    return name


def _class_rows(name: str, value: Tensor, labels: list[int]) -> Tensor:
    """Our class rows of a torchvision class-indexed tensor."""
    if name.startswith("box_head.predictor.cls_score."):
        return value[[0, *labels]]  # our box predictor keeps the background column
    if name.startswith("box_head.predictor.bbox_pred."):
        index = torch.tensor([4 * r + k for r in [0, *labels] for k in range(4)])
        return value[index]
    if name.startswith(("mask_branch.predictor.mask_fcn_logits.", "fcos_head.cls_logits.")):
        return value[labels]
    return value


def convert_torchvision(
    name: str,
    state: dict[str, Tensor],
    model: nn.Module,
    *,
    coco_labels: list[int],
    source: str,
) -> dict[str, Tensor]:
    """``state`` (a torchvision ``name`` state dict) → the part of ``model``'s state dict it covers,
    every tensor mapped (all of the model for Mask R-CNN; the backbone and FCOS head for FCOS).

    Tensors of ``state`` no prefix maps, tensors of the covered part that ``state`` lacks, and shapes
    that differ are errors naming them (``source`` is the file, for the message).
    """
    if name in UNSUPPORTED:
        raise ConversionError(f"torchvision:{name} cannot be converted: {UNSUPPORTED[name]}")
    if name not in TORCHVISION_MODELS:
        raise ConversionError(
            f"unknown torchvision model '{name}'; supported: {', '.join(TORCHVISION_MODELS)}"
        )
    spec = TORCHVISION_MODELS[name]
    cls_rows = state.get(spec.classes_key)
    if cls_rows is None:
        raise ConversionError(f"{source}: no {spec.classes_key}: not a {name}")
    labels = _rows(cls_rows.shape[0], model.num_classes, coco_labels)
    own = model.state_dict()
    converted, unmapped, wrong = {}, [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):  # BatchNorm's step counter (a model trained from
            continue  # scratch has BatchNorm; the COCO checkpoints FrozenBatchNorm2d)
        ours = _rename(key, spec.prefixes)
        if ours is None or ours not in own:
            unmapped.append(key)
            continue
        value = _class_rows(ours, value, labels)
        if value.shape != own[ours].shape:
            wrong.append(f"{key} {tuple(value.shape)} → {ours} {tuple(own[ours].shape)}")
            continue
        converted[ours] = value
    missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    if spec.covers is not None:  # the rest of the model is not in this checkpoint
        missing = [k for k in missing if k.startswith(spec.covers)]
    raise_unless_complete(
        f"{source} (torchvision:{name})", unmapped=unmapped, wrong=wrong, missing=missing
    )
    return converted
