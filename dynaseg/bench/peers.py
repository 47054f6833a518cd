"""torchvision's detectors as benchmark peers, built with random weights at a given size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dynaseg.bench.stages import StageTarget

__all__ = ["PEERS", "PEERS_WITH_MASKS", "PEER_DEPTHS", "build_peer", "peer_stage_targets"]

PEER_DEPTHS = (18, 34, 50, 101)


def _tv_backbone(depth: int, frozen_bn: bool, trainable_layers: int, **fpn: Any) -> nn.Module:
    """torchvision's ResNet-FPN with random weights (``fpn``: its returned layers / extra blocks)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    return resnet_fpn_backbone(
        backbone_name=f"resnet{depth}",
        weights=None,
        trainable_layers=trainable_layers,
        norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d,
        **fpn,
    )


def _is_builder_default(depth: int, frozen_bn: bool, trainable_layers: int) -> bool:
    """Whether torchvision's own ``*_resnet50_fpn`` builder makes this backbone (weights=None)."""
    return depth == 50 and not frozen_bn and trainable_layers == 5


def _tv_maskrcnn(
    *,
    num_classes: int,
    depth: int,
    image_size: tuple[int, int],
    detections: int | None,
    frozen_bn: bool,
    trainable_layers: int,
) -> nn.Module:
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn

    kwargs: dict[str, Any] = {"min_size": min(image_size), "max_size": max(image_size)}
    if detections is not None:
        top = max(1000, detections)
        kwargs |= {
            "box_score_thresh": 0.0,
            "box_detections_per_img": detections,
            "rpn_pre_nms_top_n_test": top,
            "rpn_post_nms_top_n_test": top,
        }
    if _is_builder_default(depth, frozen_bn, trainable_layers):
        return maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs
        )
    backbone = _tv_backbone(depth, frozen_bn, trainable_layers)
    return MaskRCNN(backbone, num_classes=num_classes + 1, **kwargs)


def _tv_fcos(
    *,
    num_classes: int,
    depth: int,
    image_size: tuple[int, int],
    detections: int | None,
    frozen_bn: bool,
    trainable_layers: int,
) -> nn.Module:
    from torchvision.models.detection import FCOS, fcos_resnet50_fpn
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    kwargs: dict[str, Any] = {"min_size": min(image_size), "max_size": max(image_size)}
    if detections is not None:
        kwargs |= {
            "score_thresh": 0.0,
            "detections_per_img": detections,
            "topk_candidates": max(1000, detections),
        }
    if _is_builder_default(depth, frozen_bn, trainable_layers):
        return fcos_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs
        )
    backbone = _tv_backbone(
        depth,
        frozen_bn,
        trainable_layers,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    return FCOS(backbone, num_classes=num_classes + 1, **kwargs)


# Peer name → constructor (keyword arguments as ``build_peer``'s).
PEERS: dict[str, Callable[..., nn.Module]] = {
    "torchvision-maskrcnn": _tv_maskrcnn,
    "torchvision-fcos": _tv_fcos,
}
PEERS_WITH_MASKS = ("torchvision-maskrcnn",)


def build_peer(
    name: str,
    *,
    num_classes: int,
    device: torch.device | str,
    image_size: tuple[int, int] = (800, 1216),
    detections: int | None = None,
    depth: int = 50,
    frozen_bn: bool = False,
    trainable_layers: int = 5,
) -> nn.Module:
    """A torchvision detector with random weights (``weights=None, weights_backbone=None``).

    Args:
        name: a key of ``PEERS``.
        num_classes: C without background (torchvision gets C + 1).
        image_size: (H, W) the peer will see; its transform's ``min_size`` / ``max_size`` are set to
            it so that it does not rescale (to 800 by default).
        detections: force exactly this many outputs (score threshold 0, cap N, ≥ max(1000, N)
            proposals / candidates), or None for torchvision's defaults.
        depth: ResNet depth of the FPN backbone (50: torchvision's own ``*_resnet50_fpn``).
        frozen_bn, trainable_layers: backbone norm and trainable stages (0-5) for training benchmarks;
            the defaults are what the constructors do without pretrained weights.
    """
    if name not in PEERS:
        raise ValueError(f"unknown peer '{name}'; choose from {', '.join(PEERS)}")
    if depth not in PEER_DEPTHS:
        raise ValueError(f"peer backbone depth must be one of {PEER_DEPTHS}, got {depth}")
    model = PEERS[name](
        num_classes=num_classes,
        depth=depth,
        image_size=image_size,
        detections=detections,
        frozen_bn=frozen_bn,
        trainable_layers=trainable_layers,
    )
    return model.to(device)


def peer_stage_targets(model: nn.Module) -> dict[str, Sequence[StageTarget]]:
    """The stages of a torchvision detector (``GeneralizedRCNN`` or ``FCOS``) for ``stage_hooks``:
    its ``transform`` (forward only: postprocess and paste are ``post``), backbone, heads and, for
    Mask R-CNN, the mask RoI pool, head and predictor (nested in ``roi_heads``, counted apart)."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    stages: dict[str, Sequence[StageTarget]] = {
        "pre": (model.transform,),
        "backbone+fpn": (model.backbone,),
    }
    if isinstance(model, FCOS):
        return stages | {"head": (model.head,)}
    if not isinstance(model, GeneralizedRCNN):
        raise TypeError(f"not a torchvision detector: {type(model).__name__}")
    heads = model.roi_heads
    stages["head"] = (model.rpn, heads)
    if heads.has_mask():
        stages["mask"] = (heads.mask_roi_pool, heads.mask_head, heads.mask_predictor)
    return stages
