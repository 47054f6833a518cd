"""BlendMask meta-architecture: ResNet-FPN → FCOS + attention (top) + bases (bottom) → blender."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from dynaseg.layers.dynamic_shapes import clip_boxes, guard_empty_rows, image_size_tensor
from dynaseg.layers.roi_align import boxes_with_batch_index
from dynaseg.modeling.backbone.fpn import ResNetFPN
from dynaseg.modeling.blendmask.attention import AttentionTopLayer
from dynaseg.modeling.blendmask.basis import BasisModule
from dynaseg.modeling.blendmask.blender import blend, blender_mask_loss, pool_bases
from dynaseg.modeling.blendmask.semantic import SemanticHead, semantic_loss, semantic_targets
from dynaseg.modeling.fcos.detector import (
    FCOSInference,
    FCOSTraining,
    fcos_detections,
    fcos_training,
)
from dynaseg.modeling.fcos.head import FCOSHead, FCOSOutputs
from dynaseg.modeling.fcos.inference import FCOSDetections
from dynaseg.modeling.fcos.targets import level_size_ranges
from dynaseg.modeling.preprocess import normalize_images
from dynaseg.structures import Batch, Instances
from dynaseg.structures.detections import RawDetections
from dynaseg.structures.masks import crop_and_resize, paste_masks, scale_boxes

__all__ = ["BlendMask", "blendmask_postprocess", "nonempty_boxes", "split_per_image"]


class BlendMask(nn.Module):
    """BlendMask on FCOS (Chen et al., CVPR 2020).

    ``forward(batch)`` returns a dict of weighted ``loss_*`` tensors in training and a list of
    :class:`Instances` at each image's original size (full-image bool masks) in evaluation.

    Args:
        backbone: ResNet-FPN giving P3-P7 (P2-P7 when ``strides`` start at 4).
        fcos_head: FCOS towers and predictors on the levels of ``strides`` (P3-P7 by default).
        attention: top layer on the box tower (K·M·M logits per location).
        basis: bottom module giving K bases at stride 4 from P3-P5.
        semantic_head: auxiliary semantic head on P3, or None.
        num_classes: C.
        strides, sizes_of_interest, center_sampling_radius, focal_alpha, focal_gamma: FCOS training.
        score_threshold, thresh_with_ctr, pre_nms_topk, nms_threshold, class_agnostic_nms, max_detections:
            FCOS inference.
        resolution, sampling_ratio: blender RoIAlign R and samples per bin.
        mask_loss_weight, semantic_loss_weight: loss weights. mask_threshold: paste-back threshold.
        pixel_mean, pixel_std: RGB normalisation (0-255 scale).
    """

    def __init__(
        self,
        *,
        backbone: ResNetFPN,
        fcos_head: FCOSHead,
        attention: AttentionTopLayer,
        basis: BasisModule,
        semantic_head: SemanticHead | None,
        num_classes: int,
        strides: tuple[int, ...],
        sizes_of_interest: tuple[int, ...],
        center_sampling_radius: float,
        focal_alpha: float,
        focal_gamma: float,
        score_threshold: float,
        thresh_with_ctr: bool,
        pre_nms_topk: int,
        nms_threshold: float,
        class_agnostic_nms: bool,
        max_detections: int,
        resolution: int,
        sampling_ratio: int,
        mask_loss_weight: float,
        semantic_loss_weight: float,
        mask_threshold: float,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.backbone, self.fcos_head, self.attention = backbone, fcos_head, attention
        self.basis, self.semantic_head = basis, semantic_head
        self.num_classes = num_classes
        # Loss parameters
        self.strides, self.size_ranges = list(strides), level_size_ranges(sizes_of_interest)
        self.fcos_training = FCOSTraining(center_sampling_radius, focal_alpha, focal_gamma)
        self.mask_loss_weight, self.semantic_loss_weight = mask_loss_weight, semantic_loss_weight
        # Inference parameters
        self.fcos_inference = FCOSInference(
            score_threshold=score_threshold,
            thresh_with_ctr=thresh_with_ctr,
            pre_nms_topk=pre_nms_topk,
            nms_threshold=nms_threshold,
            class_agnostic_nms=class_agnostic_nms,
            max_detections=max_detections,
        )
        self.resolution, self.sampling_ratio, self.mask_threshold = (
            resolution,
            sampling_ratio,
            mask_threshold,
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False
        )

    def dense_submodules(self) -> tuple[str, ...]:
        """Attribute paths of the parts that convolve whole feature maps (``inference/optimize.py``
        autocasts or compiles them); the per-instance parts stay as they are."""
        return ("backbone", "fcos_head", "basis")

    def timing_stages(self) -> dict[str, tuple[nn.Module | tuple[nn.Module, str], ...]]:
        """This model's parts per ``bench speed`` stage (``dynaseg/bench/stages.py``): modules, or
        (module, method) for work done outside ``forward``. The blend itself counts as ``post``."""
        return {
            "backbone+fpn": (self.backbone,),
            "head": (self.fcos_head,),
            "mask": (self.basis, self.attention),
        }

    @property
    def ddp_unused_parameters(self) -> bool:
        """Whether some parameters may get no gradient in a step (DDP's ``find_unused_parameters``)."""
        return False

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[Instances]:
        if self.training:
            return self.losses(batch)
        raw = self.predict_raw(batch.images, batch.image_sizes)
        return [
            blendmask_postprocess(
                *r[:4],
                input_size=input_size,
                output_size=output_size,
                mask_threshold=self.mask_threshold,
            )
            for r, input_size, output_size in zip(raw, batch.image_sizes, batch.original_sizes)
        ]

    def dense(
        self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]
    ) -> tuple[dict[str, Tensor], FCOSOutputs, Tensor]:
        """Everything computed on whole maps: FPN features, FCOS outputs, bases (B, K, Hp/4, Wp/4)."""
        features = self.backbone(self.normalize(images, image_sizes))
        return (
            features,
            self.fcos_head(self.fcos_levels(features)),
            self.basis(self.basis_levels(features)),
        )

    def fcos_levels(self, features: dict[str, Tensor]) -> list[Tensor]:
        """The pyramid levels the FCOS head runs on: P3-P7, or P2-P6 with a stride-4 first level."""
        first = self.strides[0].bit_length() - 1
        return [features[f"p{first + i}"] for i in range(len(self.strides))]

    def basis_levels(self, features: dict[str, Tensor]) -> list[Tensor]:
        """The bottom module's inputs: P3, P4, ... (stride-4 bases), whatever levels FCOS uses."""
        return [features[f"p{3 + i}"] for i in range(len(self.basis.refine))]

    def normalize(self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]) -> Tensor:
        """(B, 3, Hp, Wp) 0-255 → normalised, padding 0."""
        return normalize_images(images, image_sizes, self.pixel_mean, self.pixel_std)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        assert batch.targets is not None, "training needs batch.targets"
        features, head, bases = self.dense(batch.images, batch.image_sizes)
        pos = fcos_training(
            head,
            batch.targets,
            strides=self.strides,
            size_ranges=self.size_ranges,
            num_classes=self.num_classes,
            params=self.fcos_training,
        )
        losses = dict(pos.losses)
        attention = self.attention(
            head.box_tower, pos.image_index, pos.location_index
        )  # (P, K, M, M)
        gt_boxes = torch.cat([t.boxes for t in batch.targets])
        gt_image = torch.cat(
            [torch.full((len(t),), i, device=gt_boxes.device) for i, t in enumerate(batch.targets)]
        )
        pooled = pool_bases(
            bases,
            boxes_with_batch_index(gt_boxes, gt_image),
            resolution=self.resolution,
            sampling_ratio=self.sampling_ratio,
        )  # (G, K, R, R)
        mask_targets = torch.cat(
            [crop_and_resize(t.masks, t.boxes, self.resolution) for t in batch.targets]
        )
        mask_logits = blend(pooled[pos.gt_index], attention)
        losses["loss_mask"] = self.mask_loss_weight * blender_mask_loss(
            mask_logits, mask_targets[pos.gt_index], pos.ctr_targets, pos.ctr_sum_avg
        )
        if self.semantic_head is not None:
            logits = self.semantic_head(features["p3"])
            sem = semantic_targets(
                [t.masks for t in batch.targets],
                [t.labels for t in batch.targets],
                tuple(batch.images.shape[-2:]),
                8,
            )
            sem = sem[:, : logits.shape[-2], : logits.shape[-1]]
            losses["loss_basis_sem"] = semantic_loss(logits, sem, self.semantic_loss_weight)
        return losses

    @torch.no_grad()
    def predict_raw(
        self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]
    ) -> list[RawDetections]:
        """Detections and box-relative masks per image before paste-back (traceable: ONNX export).

        images: (B, 3, Hp, Wp) RGB 0-255, padded; image_sizes: valid (h, w) per image.
        """
        sizes = image_size_tensor(image_sizes, images.device)
        _, head, bases = self.dense(images, sizes)
        detections = fcos_detections(head, strides=self.strides, params=self.fcos_inference)
        image_index = torch.cat([torch.full_like(d.labels, i) for i, d in enumerate(detections)])
        boxes = torch.cat([clip_boxes(d.boxes, size) for d, size in zip(detections, sizes)])
        attention = self.attention(
            head.box_tower, image_index, torch.cat([d.location_index for d in detections])
        )  # (N, K, M, M)
        pooled = pool_bases(
            bases,
            boxes_with_batch_index(boxes, image_index),
            resolution=self.resolution,
            sampling_ratio=self.sampling_ratio,
        )  # (N, K, R, R)
        mask_probs = blend(*guard_empty_rows(pooled, attention))[: boxes.shape[0]].sigmoid()
        return split_per_image(boxes, mask_probs, detections)


def split_per_image(
    boxes: Tensor, mask_probs: Tensor, detections: list[FCOSDetections]
) -> list[RawDetections]:
    """Rows of all images (in image order) → per image ``RawDetections`` (one mask side R)."""
    out, start = [], 0
    for d in detections:
        end = start + d.labels.shape[0]
        probs = mask_probs[start:end]
        sides = torch.full_like(d.labels, mask_probs.shape[-1])
        out.append(RawDetections(boxes[start:end], d.scores, d.labels, probs, sides))
        start = end
    return out


def nonempty_boxes(boxes: Tensor) -> Tensor:
    """(N, 4) XYXY → (N,) bool: positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def blendmask_postprocess(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    mask_probs: Tensor,
    *,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_threshold: float,
) -> Instances:
    """Rescale one image's detections to its original size and paste the masks.

    boxes: (N, 4) clipped to ``input_size``; mask_probs: (N, R, R) → Instances with (N', H, W) bool
    masks at ``output_size`` (boxes empty after rescaling are dropped).
    """
    boxes = clip_boxes_to_image(scale_boxes(boxes, input_size, output_size), output_size)
    keep = nonempty_boxes(boxes)
    boxes, scores, labels, mask_probs = boxes[keep], scores[keep], labels[keep], mask_probs[keep]
    masks = paste_masks(mask_probs, boxes, output_size, mask_threshold)
    return Instances(image_size=output_size, boxes=boxes, labels=labels, scores=scores, masks=masks)
