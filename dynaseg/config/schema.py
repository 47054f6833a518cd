"""Typed experiment configuration: frozen dataclasses, one per component.

Only builder functions read these; modules take plain keyword arguments. Every field can be
overridden from the command line as ``section.field=value`` (see ``config/overrides.py``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "BackboneConfig",
    "FCOSConfig",
    "BasisConfig",
    "BlenderConfig",
    "BlendMaskConfig",
    "RPNConfig",
    "BoxHeadConfig",
    "FCNMaskHeadConfig",
    "DynaMaskHeadConfig",
    "RCNNConfig",
    "DR1HeadConfig",
    "DR1MaskConfig",
    "DataConfig",
    "SolverConfig",
    "InferenceConfig",
    "ExperimentConfig",
    "DYNAMASK_POLICIES",
    "num_stuff_classes",
]

Norm = Literal["FrozenBN", "BN", "GN", "SyncBN", "none"]


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    depth: Literal[18, 34, 50, 101] = 50
    width: int = 64  # stem / first-stage width; 64 = torchvision ResNet, smaller = CPU presets
    norm: Norm = "FrozenBN"  # FrozenBN for pretrained weights; BN or GN from scratch
    freeze_at: int = 2  # 0: train all; 1: freeze stem; k: freeze stem + stages res2..res{k}
    fpn_channels: int = 256
    fpn_norm: Norm = "none"
    stride_in_1x1: bool = False  # stride in each stage's first 1×1 conv (MSRA / detectron2 weights)
    deform_stages: tuple[int, ...] = ()  # DCNv2 3×3 convs in these stages (3, 4, 5 = res3-res5)
    deform_interval: int = 1  # in every k-th block of those stages (AdelaiDet's dcni3: 3)
    fpn_p2_into_p3: bool = False  # P3 += conv3×3/2(P2), PANet's bottom-up step (not in papers)


@dataclass(frozen=True, kw_only=True)
class FCOSConfig:
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)  # P3..P7
    sizes_of_interest: tuple[int, ...] = (64, 128, 256, 512)
    num_convs: int = 4  # per tower (cls and box)
    num_share_convs: int = 0  # convs both towers share, before them (AdelaiDet's real-time heads)
    location_offset: float = 0.5  # locations at cell centres; 0 = cell corners (torchvision's FCOS)
    norm: Norm = "GN"
    prior_prob: float = 0.01
    center_sampling_radius: float = 1.5  # in strides; 0 disables centre sampling
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # "location": every positive location counts once (FCOS); "object": each object's positives
    # share the weight of the mean object, so a 2-location object counts as much as a 9-location one.
    cls_weighting: Literal["location", "object"] = "location"
    use_scale: bool = False  # BlendMask turns off the per-level Scale
    # Inference parameters
    score_threshold: float = 0.05  # applied to sqrt-free cls*ctr when thresh_with_ctr
    thresh_with_ctr: bool = True
    pre_nms_topk: int = 1000  # per level per image
    nms_threshold: float = 0.6
    class_agnostic_nms: bool = (
        False  # one NMS over all classes: one box per object (AP: lower, measured)
    )
    max_detections: int = 100
    clip_before_nms: bool = False  # clip boxes to the image before NMS (torchvision's FCOS)


@dataclass(frozen=True, kw_only=True)
class BasisConfig:
    num_bases: int = 4  # K
    channels: int = 128
    num_convs: int = 3
    norm: Norm = "BN"  # SyncBN only under DDP on CUDA (falls back to BN otherwise)
    semantic_loss_weight: float = 0.3  # 0 disables the auxiliary semantic head
    semantic_channels: int = 128
    stride4_skip: bool = False  # add refined P2 after the ×2 upsampling (not in the paper)


@dataclass(frozen=True, kw_only=True)
class BlenderConfig:
    attention_size: int = 14  # M
    resolution: int = 56  # R
    sampling_ratio: int = 1
    mask_loss_weight: float = 1.0
    mask_threshold: float = 0.5  # paste-back threshold


@dataclass(frozen=True, kw_only=True)
class BlendMaskConfig:
    kind: Literal["blendmask"] = "blendmask"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    backbone_weights: str = (
        ""  # torchvision:resnet50[.IMAGENET1K_V2] or a local .pth / .safetensors
    )
    init_from: str = ""  # weights to start from, matched by name and shape (modeling/init_from.py)
    fcos: FCOSConfig = field(default_factory=FCOSConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    blender: BlenderConfig = field(default_factory=BlenderConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0-255
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32

    @property
    def mask_threshold(self) -> float:
        """The paste-back threshold on mask probabilities."""
        return self.blender.mask_threshold


@dataclass(frozen=True, kw_only=True)
class RPNConfig:
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_train: int = 1000
    post_nms_topk_test: int = 1000
    nms_threshold: float = 0.7
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    fg_iou_threshold: float = 0.7
    bg_iou_threshold: float = 0.3
    infer_anchor_strides: bool = False  # True: torchvision's anchor strides (padded size // grid)
    round_anchors: bool = True  # cell anchors rounded to pixels (torchvision); False: detectron2


@dataclass(frozen=True, kw_only=True)
class BoxHeadConfig:
    pooler_resolution: int = 7
    sampling_ratio: int = 0  # RoIAlign samples per bin; 0 = adaptive (detectron2), 2 = torchvision
    pooler_aligned: bool = True  # half-pixel RoIAlign (detectron2); False = torchvision's models
    fc_dim: int = 1024
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    iou_threshold: float = 0.5
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    # Inference parameters
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100


@dataclass(frozen=True, kw_only=True)
class FCNMaskHeadConfig:
    """Mask R-CNN's mask head: 4 convs, deconv ×2, class-specific 28×28 masks."""

    pooler_resolution: int = 14
    pooler_aligned: bool = True  # half-pixel RoIAlign (detectron2); False = torchvision's models
    sampling_ratio: int = 2  # RoIAlign samples per bin (2: fixed cost per RoI; detectron2 uses 0)
    num_convs: int = 4
    conv_dim: int = 256
    mask_threshold: float = 0.5


# DynaMask's inference resolution policies: the MSM's argmax, the size rule (Eq. 8), fixed fractions
# of each image's detections ("quota"), or one fixed side.
DynaMaskPolicy = Literal["msm", "size", "quota", "14", "28", "56", "112"]
DYNAMASK_POLICIES: tuple[str, ...] = typing.get_args(DynaMaskPolicy)


@dataclass(frozen=True, kw_only=True)
class DynaMaskHeadConfig:
    """DynaMask's r-FPN mask head and Mask Switch Module (paper §3)."""

    pooler_resolution: int = 14
    num_instance_convs: int = 2
    # Widths of L_tiny, L_small, L_medium, L_large: every refinement stage costs ≈ 0.39 GMAC at C = 256,
    # so the per-instance cost is Table 7's 0.23 / 0.62 / 1.01 / 1.40 G (the official code: 256/128/64/32).
    stage_channels: tuple[int, int, int, int] = (256, 136, 64, 24)
    class_specific: bool = True
    fuse_after_upsample: bool = (
        True  # the paper's order (FAM on the upsampled L_r); False: fuse, then upsample
    )
    msm_conv_channels: int = 128
    msm_fc_channels: int = 512
    gumbel_tau: float = 0.5
    # C_t of Eq. 5 in ``budget_unit``: "gmac" is the head's measured GMAC per instance, the paper's unit
    # (Table 5 as printed: 1.0 … 0.4 against 1.40 for the 112 path); "fraction" is a fraction of this
    # head's own 112 cost, for heads of other widths (paper-equivalent: C_t / 1.40).
    budget_target: float = 1.0
    budget_unit: Literal["gmac", "fraction"] = "gmac"
    # E(C) of Eq. 5: over the straight-through Gumbel selection Y (the paper: "the selected mask
    # resolution") or over the MSM's softmax probabilities ("probs", a smoother variant).
    budget_on: Literal["selection", "probs"] = "selection"
    # ê of Eq. 4: the Laplacian edges of each resolution's own predicted mask (Fig. 5, the paper), or
    # a separate 1×1 edge predictor per resolution ("head", the official code).
    edge_source: Literal["mask", "head"] = "mask"
    lambda_edge: float = 0.1  # λ1 (Eq. 7)
    lambda_reg: float = 0.4  # λ2 (Eq. 7)
    msm_start_iter: int = 7330  # phase 1 without the MSM: one COCO epoch at batch 16
    policy: DynaMaskPolicy = "msm"  # inference resolution choice
    # √(w0·h0) of the size rule (Eq. 8, policy "size"): "image" reads w0, h0 as each input image's size
    # (the paper's words); a number is a fixed side, e.g. 224 (FPN's canonical size, closer to Table 8's mix).
    size_reference: Literal["image"] | float = "image"
    # "quota": the MSM still runs, but fixed fractions of each image's detections get 14/28/56/112,
    # smallest boxes first (e.g. the paper's C_t = 0.4 mix, Table 9: [0.35, 0.34, 0.21, 0.10]).
    quota: tuple[float, ...] = (0.35, 0.34, 0.21, 0.10)
    mask_threshold: float = 0.5


@dataclass(frozen=True, kw_only=True)
class RCNNConfig:
    """Two-stage detectors: plain Mask R-CNN (``kind="mask_rcnn"``) and DynaMask (``kind="dynamask"``)."""

    kind: Literal["mask_rcnn", "dynamask"] = "mask_rcnn"
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(freeze_at=2))
    backbone_weights: str = ""
    init_from: str = ""
    rpn: RPNConfig = field(default_factory=RPNConfig)
    box_head: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask_head: FCNMaskHeadConfig = field(default_factory=FCNMaskHeadConfig)
    dynamask: DynaMaskHeadConfig = field(default_factory=DynaMaskHeadConfig)
    max_mask_rois_per_image: int = (
        0  # cap positive RoIs fed to the mask branch (CPU presets); 0 = all
    )
    mask_paste: Literal["aligned", "torchvision"] = "aligned"  # torchvision: its paste-back
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32

    @property
    def mask_branch(self) -> FCNMaskHeadConfig | DynaMaskHeadConfig:
        """The mask branch ``kind`` selects: ``mask_head`` (Mask R-CNN) or ``dynamask``."""
        return self.dynamask if self.kind == "dynamask" else self.mask_head

    @property
    def mask_threshold(self) -> float:
        """The paste-back threshold on mask probabilities."""
        return self.mask_branch.mask_threshold


@dataclass(frozen=True, kw_only=True)
class DR1HeadConfig:
    """DR1Mask's top layer, DR1Basis, instance predictor and panoptic layer (paper §3)."""

    basis_channels: int = 32  # C_F: 32 for instances, 64 for panoptic (paper Table 6)
    basis_norm: Norm = "BN"
    aligned_upsample: bool = (
        True  # ×2 aligned with strided convs + crop (Table 5); False: bilinear resize
    )
    dynamic_factors: Literal["both", "pre", "post", "none"] = (
        "both"  # Table 1 ablation: A, B, both, neither
    )
    context_position: Literal["box_tower", "cls_tower", "fpn"] = "box_tower"  # Table 3 ablation
    attention: Literal["factored", "full", "vector"] = (
        "factored"  # Table 4 (panoptic: vector, Table 7)
    )
    num_bases: int = 4  # K
    attention_size: int = 14  # M
    attention_rank: int = 4  # D of Eq. 8
    resolution: int = 56  # R, RoIAlign of the basis
    sampling_ratio: int = 1
    mask_loss_weight: float = 1.0
    mask_threshold: float = 0.5
    semantic_loss_weight: float = 0.3  # BlendMask's auxiliary thing-semantic head on P3 (0: off)
    semantic_channels: int = 128
    panoptic_loss_weight: float = 1.0
    # Panoptic inference
    panoptic_score_threshold: float = 0.3  # detections that become thing rows of the panoptic layer
    panoptic_group_iou: float = (
        0.5  # detections of any class overlapping more (box IoU) are one instance: one mean row
    )
    panoptic_restrict_to_boxes: bool = (
        False  # thing maps count only inside their box (not in the paper)
    )
    panoptic_min_stuff_area: int = 0  # stuff segments smaller than this become void (pixels)


@dataclass(frozen=True, kw_only=True)
class DR1MaskConfig:
    """DR1Mask on FCOS: instance segmentation, plus panoptic with ``num_stuff_classes > 0``."""

    kind: Literal["dr1mask"] = "dr1mask"
    num_classes: int = 80  # thing classes
    num_stuff_classes: int = 0  # S; 0 = instance segmentation only (COCO panoptic: 53)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    backbone_weights: str = ""
    init_from: str = ""
    fcos: FCOSConfig = field(default_factory=FCOSConfig)
    dr1: DR1HeadConfig = field(default_factory=DR1HeadConfig)
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 4  # paper §3.3: 4 with aligned upsampling instead of 32

    @property
    def mask_threshold(self) -> float:
        """The paste-back threshold on mask probabilities."""
        return self.dr1.mask_threshold


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_json: str = "datasets/synth/annotations/instances_train.json"
    train_images: str = "datasets/synth/train"
    val_json: str = "datasets/synth/annotations/instances_val.json"
    val_images: str = "datasets/synth/val"
    min_size_train: tuple[int, ...] = (
        640,
        672,
        704,
        736,
        768,
        800,
    )  # short side, sampled per image
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    hflip_prob: float = 0.5
    batch_size: int = 16  # total over all processes
    num_workers: int = 4
    aspect_ratio_grouping: bool = True
    max_instances: int = 0  # cap per training image (largest kept); 0 = no cap
    # Decoded training images kept in memory, GiB per loading process (each worker has its own);
    # later epochs skip decoding. 0 = off.
    image_cache_gb: float = 0.0
    format: Literal["auto", "coco", "lvis"] = "auto"  # auto: LVIS files recognised by content
    repeat_threshold: float = 0.0  # LVIS repeat-factor sampling threshold t (0.001); 0 = off
    on_error: Literal["stop", "skip"] = (
        "stop"  # unreadable image / bad annotation: stop, or report once and skip
    )
    # COCO panoptic annotations (panoptic models): JSON + folder of PNGs per split
    panoptic_train_json: str = "datasets/synth/annotations/panoptic_train.json"
    panoptic_train_dir: str = "datasets/synth/annotations/panoptic_train"
    panoptic_val_json: str = "datasets/synth/annotations/panoptic_val.json"
    panoptic_val_dir: str = "datasets/synth/annotations/panoptic_val"


@dataclass(frozen=True, kw_only=True)
class SolverConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw: decoupled weight decay, betas (0.9, 0.999)
    base_lr: float = 0.01
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    max_iter: int = 90_000
    lr_schedule: Literal["multistep", "cosine"] = "multistep"
    steps: tuple[int, ...] = (60_000, 80_000)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0 disables
    # Autocast: CUDA bf16 (fp16 + GradScaler without bf16); CPU bf16 where native, else float32.
    amp: bool = False
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0: evaluate only at the end
    log_period: int = 20
    on_nonfinite: Literal["stop", "skip"] = (
        "stop"  # NaN/inf loss: stop naming the term, or skip the step
    )
    max_nonfinite_skips: int = 10  # with "skip": stop after this many consecutive skipped steps
    freeze: tuple[str, ...] = ()  # model groups trained no further, e.g. backbone,rpn,box_head


@dataclass(frozen=True, kw_only=True)
class InferenceConfig:
    """Optional inference speed-ups (``dynaseg.inference.optimize``); eval, predict, serve and bench use them."""

    fold_norms: bool = True  # fold eval BatchNorm / FrozenBN into the preceding conv (exact)
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast of backbone + FPN and dense heads
    compile: bool = False  # torch.compile of the same dense submodules
    compile_backend: str = "inductor"  # torch.compile backend (tests use "aot_eager": no C++ build)


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    model: BlendMaskConfig | RCNNConfig | DR1MaskConfig = field(default_factory=BlendMaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact reruns and resumes
    channels_last: bool = False  # NHWC memory format (≈25 % faster convolutions on CPU here)


def num_stuff_classes(model: BlendMaskConfig | RCNNConfig | DR1MaskConfig) -> int:
    """Stuff classes a model config predicts (panoptic DR1Mask); 0 for instance-only models."""
    return model.num_stuff_classes if isinstance(model, DR1MaskConfig) else 0
