"""Config → model. The only place that reads model configs."""
from __future__ import annotations

from torch import nn

from dynaseg.config.schema import BlendMaskConfig
from dynaseg.modeling.backbone.fpn import ResNetFPN
from dynaseg.modeling.backbone.pretrained import load_backbone_weights
from dynaseg.modeling.backbone.resnet import ResNet
from dynaseg.modeling.blendmask.attention import AttentionTopLayer
from dynaseg.modeling.blendmask.basis import BasisModule
from dynaseg.modeling.blendmask.model import BlendMask
from dynaseg.modeling.blendmask.semantic import SemanticHead
from dynaseg.modeling.fcos.head import FCOSHead

__all__ = ["build_model", "build_backbone"]


def build_backbone(cfg: BlendMaskConfig) -> ResNetFPN:
    b = cfg.backbone
    body = ResNet(depth=b.depth, width=b.width, norm=b.norm, freeze_at=0)
    if cfg.backbone_weights:
        load_backbone_weights(body, cfg.backbone_weights)
    body._freeze(b.freeze_at)
    return ResNetFPN(body=body, out_channels=b.fpn_channels, norm=b.fpn_norm)


def build_blendmask(cfg: BlendMaskConfig) -> BlendMask:
    channels = cfg.backbone.fpn_channels
    f, basis, blender = cfg.fcos, cfg.basis, cfg.blender
    return BlendMask(
        backbone=build_backbone(cfg),
        fcos_head=FCOSHead(in_channels=channels, num_classes=cfg.num_classes, num_levels=len(f.strides),
                           num_convs=f.num_convs, norm=f.norm, prior_prob=f.prior_prob, use_scale=f.use_scale),
        attention=AttentionTopLayer(in_channels=channels, num_bases=basis.num_bases,
                                    attention_size=blender.attention_size),
        basis=BasisModule(in_channels=channels, channels=basis.channels, num_bases=basis.num_bases,
                          num_convs=basis.num_convs, norm=basis.norm),
        semantic_head=SemanticHead(in_channels=channels, channels=basis.semantic_channels,
                                   num_classes=cfg.num_classes, norm=basis.norm)
        if basis.semantic_loss_weight > 0 else None,
        num_classes=cfg.num_classes, strides=f.strides, sizes_of_interest=f.sizes_of_interest,
        center_sampling_radius=f.center_sampling_radius, focal_alpha=f.focal_alpha, focal_gamma=f.focal_gamma,
        score_threshold=f.score_threshold, thresh_with_ctr=f.thresh_with_ctr, pre_nms_topk=f.pre_nms_topk,
        nms_threshold=f.nms_threshold, max_detections=f.max_detections,
        resolution=blender.resolution, sampling_ratio=blender.sampling_ratio,
        mask_loss_weight=blender.mask_loss_weight, semantic_loss_weight=basis.semantic_loss_weight,
        mask_threshold=blender.mask_threshold, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
    )


def build_model(cfg: BlendMaskConfig) -> nn.Module:
    """Build the meta-architecture ``cfg`` describes (a ``match`` on the config type)."""
    match cfg:
        case BlendMaskConfig():
            return build_blendmask(cfg)
    raise TypeError(f"unsupported model config: {type(cfg).__name__}")
