"""torchvision's detection checkpoints → our models, tensor by tensor (``dynaseg convert``).

``maskrcnn_resnet50_fpn`` maps onto our two-stage Mask R-CNN exactly: the backbone, FPN, RPN head,
box head and mask head are torchvision's own modules inside ours, so only the prefixes and the class
rows change. With the ``mask_rcnn_r50_fpn_torchvision`` preset (RoIAlign without the half-pixel
offset, 2 samples per bin in the box pooler, torchvision's anchor strides) the converted model
gives torchvision's boxes, scores and labels (``tests/unit/convert``).

Class rows: torchvision's heads have a background row 0 and one row per label; ours have C rows
(the box predictor keeps torchvision's background column). A checkpoint with C + 1 rows maps label
c + 1 → our class c; the COCO checkpoints (91 rows: COCO category ids, 11 of them unused) map onto
an 80-class model through the COCO category ids.
"""

from __future__ import annotations

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


# torchvision key prefix → ours, for each supported model
TORCHVISION_MODELS: dict[str, tuple[tuple[str, str], ...]] = {
    "maskrcnn_resnet50_fpn": (
        ("backbone.body.", "backbone.body."),
        ("backbone.fpn.", "backbone.fpn."),
        ("rpn.head.", "rpn.rpn.head."),
        ("roi_heads.box_head.", "box_head.mlp."),
        ("roi_heads.box_predictor.", "box_head.predictor."),
        ("roi_heads.mask_head.", "mask_branch.convs."),
        ("roi_heads.mask_predictor.", "mask_branch.predictor."),
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
    """Our name of a torchvision tensor, or None when no prefix maps it."""
    return next(
        (ours + key[len(theirs) :] for theirs, ours in prefixes if key.startswith(theirs)), None
    )


def _class_rows(name: str, value: Tensor, labels: list[int]) -> Tensor:
    """Our class rows of a torchvision class-indexed tensor."""
    if name.startswith("box_head.predictor.cls_score."):
        return value[[0, *labels]]  # our box predictor keeps the background column
    if name.startswith("box_head.predictor.bbox_pred."):
        index = torch.tensor([4 * r + k for r in [0, *labels] for k in range(4)])
        return value[index]
    if name.startswith("mask_branch.predictor.mask_fcn_logits."):
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
    """``state`` (a torchvision ``name`` state dict) → ``model``'s state dict, every tensor mapped.

    Tensors of ``state`` no prefix maps, tensors ``model`` needs that ``state`` lacks, and shapes
    that differ are errors naming them (``source`` is the file, for the message).
    """
    if name in UNSUPPORTED:
        raise ConversionError(f"torchvision:{name} cannot be converted: {UNSUPPORTED[name]}")
    if name not in TORCHVISION_MODELS:
        raise ConversionError(
            f"unknown torchvision model '{name}'; supported: {', '.join(TORCHVISION_MODELS)}"
        )
    prefixes = TORCHVISION_MODELS[name]
    cls_rows = state.get("roi_heads.box_predictor.cls_score.bias")
    if cls_rows is None:
        raise ConversionError(f"{source}: no roi_heads.box_predictor.cls_score: not a {name}")
    labels = _rows(cls_rows.shape[0], model.num_classes, coco_labels)
    own = model.state_dict()
    converted, unmapped, wrong = {}, [], []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):  # BatchNorm's step counter (a model trained from
            continue  # scratch has BatchNorm; the COCO checkpoints FrozenBatchNorm2d)
        ours = _rename(key, prefixes)
        if ours is None or ours not in own:
            unmapped.append(key)
            continue
        value = _class_rows(ours, value, labels)
        if value.shape != own[ours].shape:
            wrong.append(f"{key} {tuple(value.shape)} → {ours} {tuple(own[ours].shape)}")
            continue
        converted[ours] = value
    missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    raise_unless_complete(
        f"{source} (torchvision:{name})", unmapped=unmapped, wrong=wrong, missing=missing
    )
    return converted
