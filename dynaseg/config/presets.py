"""Named experiment presets: plain functions that start from a base and override fields."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from dynaseg.config.overrides import (
    ConfigError,
    apply_overrides,
    from_dict,
    to_dict,
    with_overrides,
)
from dynaseg.config.schedules import dynamask_phase2_steps
from dynaseg.config.schema import DR1MaskConfig, ExperimentConfig, RCNNConfig, SolverConfig
from dynaseg.config.synthetic_presets import (
    blendmask_r18_synth_cpu,
    blendmask_tiny,
    dr1mask_panoptic_r18_synth_cpu,
    dr1mask_panoptic_tiny,
    dr1mask_r18_synth_cpu,
    dr1mask_tiny,
    dynamask_r18_synth_cpu,
    dynamask_tiny,
    mask_rcnn_r18_synth_cpu,
    mask_rcnn_tiny,
)

__all__ = ["PRESETS", "load_config", "save_config"]


def blendmask_r50_fpn_1x() -> ExperimentConfig:
    """AdelaiDet's BlendMask R_50_1x: bs16, LR 0.01, 90k iterations, short side 640-800."""
    return ExperimentConfig(output_dir="runs/blendmask_r50_fpn_1x")


def blendmask_r50_fpn_adelaidet() -> ExperimentConfig:
    """AdelaiDet's BlendMask R_50 checkpoints (``dynaseg convert --from detectron2 FILE``): MSRA's
    ResNet (stride in the first 1×1 conv, mean-only normalisation; the conversion turns its BGR
    stem into RGB); otherwise our R_50_1x preset, which follows AdelaiDet's config."""
    return with_overrides(
        blendmask_r50_fpn_1x(),
        {
            "model.backbone.stride_in_1x1": True,
            "model.pixel_std": (1.0, 1.0, 1.0),
            "output_dir": "runs/blendmask_r50_fpn_adelaidet",
        },
    )


def blendmask_550_r50_3x() -> ExperimentConfig:
    """AdelaiDet's BlendMask 550_R_50_3x (38.7 box / 34.5 mask AP, 28 FPS on a V100): 550 px input,
    FCOS on P3-P6 with a 3-conv tower shared by classification and regression, 2-conv bottom module."""
    return with_overrides(
        blendmask_r50_fpn_1x(),
        {
            "model.fcos.strides": (8, 16, 32, 64),
            "model.fcos.sizes_of_interest": (64, 128, 256),
            "model.fcos.num_share_convs": 3,
            "model.fcos.num_convs": 0,
            "model.basis.num_convs": 2,
            "data.min_size_train": (440, 462, 484, 506, 528, 550),
            "data.max_size_train": 916,
            "data.min_size_test": 550,
            "data.max_size_test": 916,
            "solver.max_iter": 270_000,
            "solver.steps": (210_000, 250_000),
            "output_dir": "runs/blendmask_550_r50_3x",
        },
    )


def blendmask_rt_r50_550() -> ExperimentConfig:
    """AdelaiDet's real-time BlendMask (RT_R_50_4x_syncbn_shtw: 39.3 box / 35.1 mask AP, 31 FPS at
    its 512-736 px test size) at a 550 px test input: FCOS on P3-P5 only with a 3-conv tower shared
    by classification and regression, 2-conv bottom module, BN trained in the backbone, 4x
    schedule. ``data.min_size_test=512 data.max_size_test=736`` is AdelaiDet's own test size."""
    return with_overrides(
        blendmask_r50_fpn_1x(),
        {
            "model.fcos.strides": (8, 16, 32),
            "model.fcos.sizes_of_interest": (64, 128),
            "model.fcos.num_share_convs": 3,
            "model.fcos.num_convs": 0,
            "model.basis.num_convs": 2,
            "model.backbone.norm": "SyncBN",
            "model.backbone.freeze_at": 0,
            "data.min_size_train": tuple(range(256, 609, 32)),
            "data.max_size_train": 900,
            "data.min_size_test": 550,
            "data.max_size_test": 916,
            "solver.max_iter": 360_000,
            "solver.steps": (300_000, 340_000),
            "output_dir": "runs/blendmask_rt_r50_550",
        },
    )


def blendmask_r101_dcni3_5x() -> ExperimentConfig:
    """AdelaiDet's BlendMask R_101_dcni3_5x (46.8 box / 41.1 mask AP): ResNet-101 with DCNv2 in
    every third block of res3-res5, 5x schedule, training short side 640-864."""
    return with_overrides(
        blendmask_r50_fpn_1x(),
        {
            "model.backbone.depth": 101,
            "model.backbone.deform_stages": (3, 4, 5),
            "model.backbone.deform_interval": 3,
            "data.min_size_train": tuple(range(640, 865, 32)),
            "data.max_size_train": 1440,
            "solver.max_iter": 400_000,
            "solver.steps": (280_000, 360_000),
            "output_dir": "runs/blendmask_r101_dcni3_5x",
        },
    )


def blendmask_r50_fpn_3x() -> ExperimentConfig:
    return with_overrides(
        blendmask_r50_fpn_1x(),
        {
            "solver.max_iter": 270_000,
            "solver.steps": (210_000, 250_000),
            "output_dir": "runs/blendmask_r50_fpn_3x",
        },
    )


def blendmask_r101_fpn_3x() -> ExperimentConfig:
    return with_overrides(
        blendmask_r50_fpn_3x(),
        {"model.backbone.depth": 101, "output_dir": "runs/blendmask_r101_fpn_3x"},
    )


def mask_rcnn_r50_fpn_1x() -> ExperimentConfig:
    """detectron2's Mask R-CNN R50-FPN 1x: bs16, LR 0.02, 90k iterations, 28×28 masks."""
    return ExperimentConfig(
        model=RCNNConfig(kind="mask_rcnn"),
        solver=SolverConfig(base_lr=0.02),
        output_dir="runs/mask_rcnn_r50_fpn_1x",
    )


def mask_rcnn_r50_fpn_torchvision() -> ExperimentConfig:
    """torchvision's ``maskrcnn_resnet50_fpn`` layer for layer (``dynaseg convert --from
    torchvision:maskrcnn_resnet50_fpn``): RoIAlign without the half-pixel offset, 2 samples per bin
    in the box pooler, anchor strides inferred from the padded size, torchvision's mask paste-back;
    otherwise our R50-FPN preset."""
    return with_overrides(
        mask_rcnn_r50_fpn_1x(),
        {
            "model.box_head.pooler_aligned": False,
            "model.box_head.sampling_ratio": 2,
            "model.mask_head.pooler_aligned": False,
            "model.rpn.infer_anchor_strides": True,
            "model.mask_paste": "torchvision",
            "output_dir": "runs/mask_rcnn_r50_fpn_torchvision",
        },
    )


def mask_rcnn_r50_fpn_detectron2() -> ExperimentConfig:
    """detectron2's model-zoo Mask R-CNN R50-FPN (``dynaseg convert --from detectron2 FILE``):
    MSRA's ResNet (stride in the first 1×1 conv, mean-only normalisation; the conversion turns its
    BGR stem into RGB), unrounded anchors, mask RoIAlign sampling adaptive; otherwise our preset."""
    return with_overrides(
        mask_rcnn_r50_fpn_1x(),
        {
            "model.backbone.stride_in_1x1": True,
            "model.pixel_std": (1.0, 1.0, 1.0),
            "model.rpn.round_anchors": False,
            "model.mask_head.sampling_ratio": 0,
            "output_dir": "runs/mask_rcnn_r50_fpn_detectron2",
        },
    )


_COCO_EPOCH_ITERS = 7330  # 117 266 COCO train2017 images with annotations at batch 16


def dynamask_r50_fpn_1x() -> ExperimentConfig:
    """DynaMask R50-FPN 1x (paper §4.1): one epoch without the MSM at LR 0.02, then all modules for
    12 epochs at the same LR, x0.1 after 8 and 11 of them (13 epochs in all)."""
    cfg = ExperimentConfig(
        model=RCNNConfig(kind="dynamask"),  # msm_start_iter: one epoch by default
        solver=SolverConfig(base_lr=0.02, max_iter=13 * _COCO_EPOCH_ITERS),
        output_dir="runs/dynamask_r50_fpn_1x",
    )
    steps = dynamask_phase2_steps(cfg.model.dynamask.msm_start_iter, cfg.solver.max_iter)
    return with_overrides(cfg, {"solver.steps": steps})


# LVIS v1 (detectron2's LVISv1 Mask R-CNN 1x recipe): 1203 classes, repeat-factor sampling at
# t = 0.001, 300 detections per image down to score 1e-4. Images are COCO's: LVIS v1 names them by
# coco_url, found under the COCO root (datasets/coco/{train,val}2017/).
_LVIS = {
    "model.num_classes": 1203,
    "model.box_head.score_threshold": 0.0001,
    "model.box_head.detections_per_image": 300,
    "data.train_json": "datasets/lvis/lvis_v1_train.json",
    "data.train_images": "datasets/coco",
    "data.val_json": "datasets/lvis/lvis_v1_val.json",
    "data.val_images": "datasets/coco",
    "data.format": "lvis",
    "data.repeat_threshold": 0.001,
}
_LVIS_EPOCH_ITERS = 6261  # 100 170 LVIS v1 training images at batch 16


def mask_rcnn_r50_fpn_lvis_1x() -> ExperimentConfig:
    """Mask R-CNN R50-FPN 1x on LVIS v1 (detectron2's LVISv1 recipe; DynaMask paper Table 10)."""
    return with_overrides(
        mask_rcnn_r50_fpn_1x(), _LVIS | {"output_dir": "runs/mask_rcnn_r50_fpn_lvis_1x"}
    )


def dynamask_r50_fpn_lvis_1x() -> ExperimentConfig:
    """DynaMask R50-FPN 1x on LVIS v1 (paper Table 10): the LVIS recipe above; phase 1 (no MSM)
    lasts one LVIS epoch at batch 16."""
    return with_overrides(
        dynamask_r50_fpn_1x(),
        _LVIS
        | {
            "model.dynamask.msm_start_iter": _LVIS_EPOCH_ITERS,
            "solver.max_iter": 90_000,  # the LVIS recipe's 1x, as the Mask R-CNN beside it
            "solver.steps": (60_000, 80_000),
            "output_dir": "runs/dynamask_r50_fpn_lvis_1x",
        },
    )


# Cityscapes fine instances (detectron2's Cityscapes Mask R-CNN recipe): 8 classes, 2975 training
# images at 1024x2048, short side 800-1024 in training and 1024 at test, batch 8, LR 0.01, 24k
# iterations (LR x0.1 at 18k). Files from `dynaseg data cityscapes --root datasets/cityscapes
# --out datasets/cityscapes`; evaluation adds the official Cityscapes AP / AP50.
_CITYSCAPES = {
    "model.num_classes": 8,
    "data.train_json": "datasets/cityscapes/annotations/instances_train.json",
    "data.train_images": "datasets/cityscapes/leftImg8bit/train",
    "data.val_json": "datasets/cityscapes/annotations/instances_val.json",
    "data.val_images": "datasets/cityscapes/leftImg8bit/val",
    "data.min_size_train": (800, 832, 864, 896, 928, 960, 992, 1024),
    "data.max_size_train": 2048,
    "data.min_size_test": 1024,
    "data.max_size_test": 2048,
    "data.batch_size": 8,
    "solver.base_lr": 0.01,
    "solver.max_iter": 24_000,
    "solver.steps": (18_000,),
    "solver.checkpoint_period": 4000,
}
_CITYSCAPES_EPOCH_ITERS = 372  # 2975 training images at batch 8


def mask_rcnn_r50_fpn_cityscapes() -> ExperimentConfig:
    """Mask R-CNN R50-FPN on Cityscapes fine (detectron2's recipe; DynaMask paper Table 4)."""
    return with_overrides(
        mask_rcnn_r50_fpn_1x(), _CITYSCAPES | {"output_dir": "runs/mask_rcnn_r50_fpn_cityscapes"}
    )


def dynamask_r50_fpn_cityscapes() -> ExperimentConfig:
    """DynaMask R50-FPN on Cityscapes fine (paper Table 4): the recipe above; phase 1 (no MSM)
    lasts one epoch at batch 8."""
    return with_overrides(
        dynamask_r50_fpn_1x(),
        _CITYSCAPES
        | {
            "model.dynamask.msm_start_iter": _CITYSCAPES_EPOCH_ITERS,
            "output_dir": "runs/dynamask_r50_fpn_cityscapes",
        },
    )


def dr1mask_r50_fpn_1x() -> ExperimentConfig:
    """DR1Mask R50 1x (paper §4.1): BlendMask's schedule (bs16, LR 0.01, 90k), C_F = 32, factored attention."""
    return ExperimentConfig(model=DR1MaskConfig(), output_dir="runs/dr1mask_r50_fpn_1x")


def dr1mask_panoptic_r50_fpn_1x() -> ExperimentConfig:
    """Panoptic DR1Mask R50 1x on COCO panoptic: 53 stuff classes, C_F = 64, vector embedding (Table 7)."""
    return with_overrides(
        dr1mask_r50_fpn_1x(),
        {
            "model.num_stuff_classes": 53,
            "model.dr1.basis_channels": 64,
            "model.dr1.attention": "vector",
            "model.dr1.semantic_loss_weight": 0.0,
            "data.panoptic_train_json": "datasets/coco/annotations/panoptic_train2017.json",
            "data.panoptic_train_dir": "datasets/coco/annotations/panoptic_train2017",
            "data.panoptic_val_json": "datasets/coco/annotations/panoptic_val2017.json",
            "data.panoptic_val_dir": "datasets/coco/annotations/panoptic_val2017",
            "output_dir": "runs/dr1mask_panoptic_r50_fpn_1x",
        },
    )


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "blendmask_r50_fpn_1x": blendmask_r50_fpn_1x,
    "blendmask_r50_fpn_3x": blendmask_r50_fpn_3x,
    "blendmask_r101_fpn_3x": blendmask_r101_fpn_3x,
    "blendmask_r18_synth_cpu": blendmask_r18_synth_cpu,
    "blendmask_tiny": blendmask_tiny,
    "mask_rcnn_r50_fpn_1x": mask_rcnn_r50_fpn_1x,
    "mask_rcnn_r50_fpn_torchvision": mask_rcnn_r50_fpn_torchvision,
    "mask_rcnn_r50_fpn_detectron2": mask_rcnn_r50_fpn_detectron2,
    "blendmask_r50_fpn_adelaidet": blendmask_r50_fpn_adelaidet,
    "blendmask_550_r50_3x": blendmask_550_r50_3x,
    "blendmask_rt_r50_550": blendmask_rt_r50_550,
    "blendmask_r101_dcni3_5x": blendmask_r101_dcni3_5x,
    "dynamask_r50_fpn_1x": dynamask_r50_fpn_1x,
    "mask_rcnn_r50_fpn_lvis_1x": mask_rcnn_r50_fpn_lvis_1x,
    "dynamask_r50_fpn_lvis_1x": dynamask_r50_fpn_lvis_1x,
    "mask_rcnn_r50_fpn_cityscapes": mask_rcnn_r50_fpn_cityscapes,
    "dynamask_r50_fpn_cityscapes": dynamask_r50_fpn_cityscapes,
    "mask_rcnn_r18_synth_cpu": mask_rcnn_r18_synth_cpu,
    "dynamask_r18_synth_cpu": dynamask_r18_synth_cpu,
    "mask_rcnn_tiny": mask_rcnn_tiny,
    "dynamask_tiny": dynamask_tiny,
    "dr1mask_r50_fpn_1x": dr1mask_r50_fpn_1x,
    "dr1mask_panoptic_r50_fpn_1x": dr1mask_panoptic_r50_fpn_1x,
    "dr1mask_r18_synth_cpu": dr1mask_r18_synth_cpu,
    "dr1mask_panoptic_r18_synth_cpu": dr1mask_panoptic_r18_synth_cpu,
    "dr1mask_tiny": dr1mask_tiny,
    "dr1mask_panoptic_tiny": dr1mask_panoptic_tiny,
}


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """A preset name or a YAML file (e.g. a run's ``config.yaml``), then ``key=value`` overrides."""
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]()
    elif Path(name_or_path).suffix in (".yaml", ".yml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            cfg = from_dict(ExperimentConfig, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    else:
        import difflib

        close = difflib.get_close_matches(name_or_path, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; presets: {', '.join(PRESETS)}"
        raise ConfigError(f"unknown config '{name_or_path}' (not a preset or a .yaml file){hint}")
    return apply_overrides(cfg, list(overrides))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
