"""Config → model. The only place that reads model configs."""

from __future__ import annotations

import dataclasses

from torch import nn

from dynaseg.config.overrides import ConfigError
from dynaseg.config.schema import BlendMaskConfig, DR1MaskConfig, FCNMaskHeadConfig, RCNNConfig
from dynaseg.modeling.backbone.fpn import ResNetFPN
from dynaseg.modeling.backbone.pretrained import load_backbone_weights
from dynaseg.modeling.backbone.resnet import ResNet
from dynaseg.modeling.blendmask.attention import AttentionTopLayer
from dynaseg.modeling.blendmask.basis import BasisModule
from dynaseg.modeling.blendmask.model import BlendMask
from dynaseg.modeling.dr1mask.basis import DR1Basis
from dynaseg.modeling.dr1mask.instance_head import InstancePredictor
from dynaseg.modeling.dr1mask.model import DR1Mask
from dynaseg.modeling.dr1mask.panoptic import PanopticLayer
from dynaseg.modeling.dr1mask.top_layer import DR1TopLayer
from dynaseg.modeling.dynamask.branch import DynaMaskBranch
from dynaseg.modeling.dynamask.head import DynaMaskHead
from dynaseg.modeling.dynamask.mask_switch import MaskSwitchModule
from dynaseg.modeling.fcos.detector import FCOSInference, FCOSTraining
from dynaseg.modeling.fcos.head import FCOSHead
from dynaseg.modeling.init_from import init_from
from dynaseg.modeling.one_stage.detector import FCOSParams
from dynaseg.modeling.one_stage.semantic import SemanticHead
from dynaseg.modeling.rcnn.box_head import BoxHead
from dynaseg.modeling.rcnn.fcn_mask_head import FCNMaskHead
from dynaseg.modeling.rcnn.model import TwoStageDetector
from dynaseg.modeling.rcnn.rpn import RPN

__all__ = ["build_model", "build_backbone"]


def build_backbone(
    cfg: BlendMaskConfig | RCNNConfig | DR1MaskConfig, layout: str = "p3p7"
) -> ResNetFPN:
    b = cfg.backbone
    body = ResNet(
        depth=b.depth,
        width=b.width,
        norm=b.norm,
        freeze_at=0,
        stride_in_1x1=b.stride_in_1x1,
        deform_stages=b.deform_stages,
        deform_interval=b.deform_interval,
    )
    if cfg.backbone_weights:
        load_backbone_weights(body, cfg.backbone_weights)
    body._freeze(b.freeze_at)
    if b.fpn_p2_into_p3 and not layout.startswith("p2"):
        raise ConfigError(
            f"model.backbone.fpn_p2_into_p3=true needs P2, but this model's FPN is {layout}"
        )
    return ResNetFPN(
        body=body,
        out_channels=b.fpn_channels,
        norm=b.fpn_norm,
        layout=layout,
        p2_into_p3=b.fpn_p2_into_p3,
    )


def fcos_layout(cfg: BlendMaskConfig | DR1MaskConfig) -> str:
    """The FPN layout FCOS's strides need: P3-P7 (8 … 128), AdelaiDet's lighter P3-P6 / P3-P5 for
    BlendMask, or for BlendMask P2-P6 (4 … 64); P2-P7 when BlendMask's bases take a P2 skip or P2
    goes into P3."""
    s, soi = tuple(cfg.fcos.strides), cfg.fcos.sizes_of_interest
    layouts = {(8, 16, 32, 64, 128): "p3p7"}
    if isinstance(cfg, BlendMaskConfig):
        layouts |= {(8, 16, 32, 64): "p3p6", (8, 16, 32): "p3p5", (4, 8, 16, 32, 64): "p2p6conv"}
    if s not in layouts:
        raise ConfigError(
            f"model.fcos.strides={list(s)}: expected one of {', '.join(str(list(k)) for k in layouts)}"
        )
    if len(soi) != len(s) - 1:
        raise ConfigError(
            f"model.fcos.sizes_of_interest={list(soi)}: needs {len(s) - 1} bounds for {len(s)} levels"
        )
    layout = layouts[s]
    skip = isinstance(cfg, BlendMaskConfig) and cfg.basis.stride4_skip
    for wanted, name in (
        (skip, "model.basis.stride4_skip"),
        (cfg.backbone.fpn_p2_into_p3, "model.backbone.fpn_p2_into_p3"),
    ):
        if wanted and layout.startswith("p3"):
            if layout != "p3p7":
                raise ConfigError(
                    f"{name}=true needs P2: model.fcos.strides={list(s)} is supported only as "
                    "[8, 16, 32, 64, 128] or [4, 8, 16, 32, 64]"
                )
            return "p2p7"
    return layout


def build_fcos_head(cfg: BlendMaskConfig | DR1MaskConfig) -> FCOSHead:
    f = cfg.fcos
    return FCOSHead(
        in_channels=cfg.backbone.fpn_channels,
        num_classes=cfg.num_classes,
        num_levels=len(f.strides),
        num_convs=f.num_convs,
        num_share_convs=f.num_share_convs,
        norm=f.norm,
        prior_prob=f.prior_prob,
        use_scale=f.use_scale,
    )


def fcos_params(cfg: BlendMaskConfig | DR1MaskConfig) -> FCOSParams:
    f = cfg.fcos
    return FCOSParams(
        strides=tuple(f.strides),
        sizes_of_interest=tuple(f.sizes_of_interest),
        training=FCOSTraining(
            f.center_sampling_radius, f.focal_alpha, f.focal_gamma, f.cls_weighting
        ),
        inference=FCOSInference(
            score_threshold=f.score_threshold,
            thresh_with_ctr=f.thresh_with_ctr,
            pre_nms_topk=f.pre_nms_topk,
            nms_threshold=f.nms_threshold,
            class_agnostic_nms=f.class_agnostic_nms,
            max_detections=f.max_detections,
            clip_before_nms=f.clip_before_nms,
        ),
        location_offset=f.location_offset,
    )


def build_mask_branch(cfg: RCNNConfig) -> nn.Module:
    channels = cfg.backbone.fpn_channels
    m = cfg.mask_branch  # FCNMaskHeadConfig | DynaMaskHeadConfig
    if isinstance(m, FCNMaskHeadConfig):
        return FCNMaskHead(
            in_channels=channels,
            num_classes=cfg.num_classes,
            conv_dim=m.conv_dim,
            num_convs=m.num_convs,
            pooler_resolution=m.pooler_resolution,
            sampling_ratio=m.sampling_ratio,
            pooler_aligned=m.pooler_aligned,
        )
    head = DynaMaskHead(
        in_channels=channels,
        num_classes=cfg.num_classes,
        stage_channels=m.stage_channels,
        num_instance_convs=m.num_instance_convs,
        class_specific=m.class_specific,
        fuse_after_upsample=m.fuse_after_upsample,
        edge_head=m.edge_source == "head",
    )
    msm = MaskSwitchModule(
        in_channels=channels,
        num_choices=4,
        conv_channels=m.msm_conv_channels,
        fc_channels=m.msm_fc_channels,
        input_size=m.pooler_resolution,
    )
    return DynaMaskBranch(
        head=head,
        msm=msm,
        num_classes=cfg.num_classes,
        gumbel_tau=m.gumbel_tau,
        budget_target=m.budget_target,
        budget_unit=m.budget_unit,
        budget_on=m.budget_on,
        edge_source=m.edge_source,
        lambda_edge=m.lambda_edge,
        lambda_reg=m.lambda_reg,
        msm_start_iter=m.msm_start_iter,
        policy=m.policy,
        quota=m.quota,
        size_reference=m.size_reference,
    )


def build_rcnn(cfg: RCNNConfig) -> TwoStageDetector:
    channels = cfg.backbone.fpn_channels
    r, b = cfg.rpn, cfg.box_head
    return TwoStageDetector(
        backbone=build_backbone(cfg, layout="p2p6"),
        rpn=RPN(
            in_channels=channels,
            anchor_sizes=r.anchor_sizes,
            aspect_ratios=r.aspect_ratios,
            pre_nms_topk_train=r.pre_nms_topk_train,
            pre_nms_topk_test=r.pre_nms_topk_test,
            post_nms_topk_train=r.post_nms_topk_train,
            post_nms_topk_test=r.post_nms_topk_test,
            nms_threshold=r.nms_threshold,
            infer_anchor_strides=r.infer_anchor_strides,
            round_anchors=r.round_anchors,
            batch_size_per_image=r.batch_size_per_image,
            positive_fraction=r.positive_fraction,
            fg_iou_threshold=r.fg_iou_threshold,
            bg_iou_threshold=r.bg_iou_threshold,
        ),
        box_head=BoxHead(
            in_channels=channels,
            num_classes=cfg.num_classes,
            fc_dim=b.fc_dim,
            pooler_resolution=b.pooler_resolution,
            sampling_ratio=b.sampling_ratio,
            pooler_aligned=b.pooler_aligned,
            batch_size_per_image=b.batch_size_per_image,
            positive_fraction=b.positive_fraction,
            iou_threshold=b.iou_threshold,
            bbox_reg_weights=b.bbox_reg_weights,
            score_threshold=b.score_threshold,
            nms_threshold=b.nms_threshold,
            detections_per_image=b.detections_per_image,
        ),
        mask_branch=build_mask_branch(cfg),
        num_classes=cfg.num_classes,
        max_mask_rois_per_image=cfg.max_mask_rois_per_image,
        mask_threshold=cfg.mask_threshold,
        mask_paste=cfg.mask_paste,
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
    )


def build_blendmask(cfg: BlendMaskConfig) -> BlendMask:
    channels = cfg.backbone.fpn_channels
    basis, blender = cfg.basis, cfg.blender
    return BlendMask(
        backbone=build_backbone(cfg, layout=fcos_layout(cfg)),
        fcos_head=build_fcos_head(cfg),
        attention=AttentionTopLayer(
            in_channels=channels, num_bases=basis.num_bases, attention_size=blender.attention_size
        ),
        basis=BasisModule(
            in_channels=channels,
            channels=basis.channels,
            num_bases=basis.num_bases,
            num_convs=basis.num_convs,
            norm=basis.norm,
            stride4_skip=basis.stride4_skip,
        ),
        semantic_head=SemanticHead(
            in_channels=channels,
            channels=basis.semantic_channels,
            num_classes=cfg.num_classes,
            norm=basis.norm,
        )
        if basis.semantic_loss_weight > 0
        else None,
        num_classes=cfg.num_classes,
        fcos=fcos_params(cfg),
        resolution=blender.resolution,
        sampling_ratio=blender.sampling_ratio,
        mask_loss_weight=blender.mask_loss_weight,
        semantic_loss_weight=basis.semantic_loss_weight,
        mask_threshold=blender.mask_threshold,
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
    )


def build_dr1mask(cfg: DR1MaskConfig) -> DR1Mask:
    channels = cfg.backbone.fpn_channels
    f, d = cfg.fcos, cfg.dr1
    predictor = InstancePredictor(
        kind=d.attention,
        channels=d.basis_channels,
        num_bases=d.num_bases,
        attention_size=d.attention_size,
        rank=d.attention_rank,
        panoptic=cfg.num_stuff_classes > 0,
    )
    return DR1Mask(
        backbone=build_backbone(cfg, layout=fcos_layout(cfg)),
        fcos_head=build_fcos_head(cfg),
        top_layer=DR1TopLayer(
            in_channels=channels,
            embedding_dim=predictor.embedding_dim,
            basis_channels=d.basis_channels,
            context_position=d.context_position,
        ),
        basis=DR1Basis(
            in_channels=channels,
            channels=d.basis_channels,
            num_levels=len(f.strides),
            norm=d.basis_norm,
            aligned_upsample=d.aligned_upsample,
            factors=d.dynamic_factors,
        ),
        predictor=predictor,
        panoptic_layer=PanopticLayer(
            channels=d.basis_channels, num_stuff_classes=cfg.num_stuff_classes
        )
        if cfg.num_stuff_classes > 0
        else None,
        semantic_head=SemanticHead(
            in_channels=channels,
            channels=d.semantic_channels,
            num_classes=cfg.num_classes,
            norm=d.basis_norm,
        )
        if d.semantic_loss_weight > 0
        else None,
        num_classes=cfg.num_classes,
        fcos=fcos_params(cfg),
        resolution=d.resolution,
        sampling_ratio=d.sampling_ratio,
        mask_loss_weight=d.mask_loss_weight,
        semantic_loss_weight=d.semantic_loss_weight,
        panoptic_loss_weight=d.panoptic_loss_weight,
        mask_threshold=d.mask_threshold,
        panoptic_score_threshold=d.panoptic_score_threshold,
        panoptic_group_iou=d.panoptic_group_iou,
        panoptic_restrict_to_boxes=d.panoptic_restrict_to_boxes,
        panoptic_min_stuff_area=d.panoptic_min_stuff_area,
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
    )


def build_model(
    cfg: BlendMaskConfig | RCNNConfig | DR1MaskConfig, *, pretrained: bool = True
) -> nn.Module:
    """Build the meta-architecture ``cfg`` describes (a ``match`` on the config type).

    ``backbone_weights`` and then ``init_from`` (matching tensors of another model) are loaded;
    ``pretrained=False`` skips both (weights that a checkpoint, loaded next, replaces; or models
    that are only measured)."""
    if not pretrained:
        cfg = dataclasses.replace(cfg, backbone_weights="", init_from="")
    match cfg:
        case BlendMaskConfig():
            model: nn.Module = build_blendmask(cfg)
        case RCNNConfig():
            model = build_rcnn(cfg)
        case DR1MaskConfig():
            model = build_dr1mask(cfg)
        case _:
            raise TypeError(f"unsupported model config: {type(cfg).__name__}")
    if cfg.init_from:
        init_from(model, cfg.init_from)
    return model
