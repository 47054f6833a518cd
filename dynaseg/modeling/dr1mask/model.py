"""DR1Mask meta-architecture (Chen, Shen, Tian 2020): FCOS + top layer + DR1Basis + instance predictor,
plus the one-layer unified panoptic head when built with stuff classes."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from dynaseg.layers.dynamic_shapes import clip_boxes, guard_empty_rows, image_size_tensor
from dynaseg.layers.roi_align import boxes_with_batch_index
from dynaseg.modeling.backbone.fpn import ResNetFPN
from dynaseg.modeling.blendmask.blender import blender_mask_loss, pool_bases
from dynaseg.modeling.blendmask.model import (
    blendmask_postprocess,
    nonempty_boxes,
    split_per_image,
)
from dynaseg.modeling.blendmask.semantic import SemanticHead, semantic_loss, semantic_targets
from dynaseg.modeling.dr1mask.basis import DR1Basis
from dynaseg.modeling.dr1mask.instance_head import InstancePredictor
from dynaseg.modeling.dr1mask.panoptic import (
    PanopticLayer,
    group_duplicate_detections,
    mean_embeddings_per_instance,
    panoptic_logits,
    panoptic_loss,
    panoptic_postprocess,
    panoptic_targets,
)
from dynaseg.modeling.dr1mask.top_layer import DR1TopLayer
from dynaseg.modeling.fcos.detector import (
    FCOSInference,
    FCOSPositives,
    FCOSTraining,
    fcos_detections,
    fcos_training,
)
from dynaseg.modeling.fcos.head import FCOSHead, FCOSOutputs
from dynaseg.modeling.fcos.targets import level_size_ranges
from dynaseg.modeling.preprocess import normalize_images
from dynaseg.structures import Batch, Instances
from dynaseg.structures.detections import PanopticMaps, RawDetections
from dynaseg.structures.masks import crop_and_resize, scale_boxes
from dynaseg.structures.panoptic import PanopticSegmentation

__all__ = ["DR1Mask", "PanopticInference", "dr1mask_postprocess"]

BASIS_STRIDE = 4


class PanopticInference(NamedTuple):
    """Panoptic DR1Mask's test-time parameters (see ``DR1HeadConfig``)."""

    num_stuff: int
    score_threshold: float
    group_iou: float
    restrict_to_boxes: bool
    min_stuff_area: int


class DR1Mask(nn.Module):
    """DR1Mask for instance or (with ``panoptic_layer``) panoptic segmentation.

    ``forward(batch)`` returns weighted ``loss_*`` tensors in training; in evaluation a list of
    :class:`Instances` (instance model) or of :class:`PanopticSegmentation` whose ``instances`` are
    the thing detections (panoptic model), at each image's original size.

    Args:
        backbone: ResNet-FPN giving P3-P7. fcos_head: FCOS on P3-P7.
        top_layer: embeddings and DR1Basis context from the box tower (Eq. 5).
        basis: DR1Basis giving F at stride 4 (Eq. 6). predictor: instance prediction (Eq. 7-8).
        panoptic_layer: static stuff rows of the panoptic layer (Eq. 9), or None.
        semantic_head: BlendMask's auxiliary thing-semantic head on P3, or None.
        num_classes: thing classes. strides … max_detections: FCOS training and inference.
        resolution, sampling_ratio: RoIAlign of F. mask_loss_weight, semantic_loss_weight,
        panoptic_loss_weight: loss weights. mask_threshold: paste-back threshold.
        panoptic_score_threshold, panoptic_group_iou, panoptic_restrict_to_boxes, panoptic_min_stuff_area:
        panoptic inference (see ``DR1HeadConfig``).
        pixel_mean, pixel_std: RGB normalisation (0-255 scale).
    """

    def __init__(
        self,
        *,
        backbone: ResNetFPN,
        fcos_head: FCOSHead,
        top_layer: DR1TopLayer,
        basis: DR1Basis,
        predictor: InstancePredictor,
        panoptic_layer: PanopticLayer | None,
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
        panoptic_loss_weight: float,
        mask_threshold: float,
        panoptic_score_threshold: float,
        panoptic_group_iou: float,
        panoptic_restrict_to_boxes: bool,
        panoptic_min_stuff_area: int,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.backbone, self.fcos_head, self.top_layer = backbone, fcos_head, top_layer
        self.basis, self.predictor, self.panoptic_layer = basis, predictor, panoptic_layer
        self.semantic_head = semantic_head
        self.num_classes = num_classes
        self.num_stuff = 0 if panoptic_layer is None else panoptic_layer.stuff_weight.shape[0]
        self.strides, self.size_ranges = list(strides), level_size_ranges(sizes_of_interest)
        self.fcos_training = FCOSTraining(center_sampling_radius, focal_alpha, focal_gamma)
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
        self.mask_loss_weight, self.semantic_loss_weight = mask_loss_weight, semantic_loss_weight
        self.panoptic_loss_weight = panoptic_loss_weight
        self.panoptic_inference = PanopticInference(
            num_stuff=self.num_stuff,
            score_threshold=panoptic_score_threshold,
            group_iou=panoptic_group_iou,
            restrict_to_boxes=panoptic_restrict_to_boxes,
            min_stuff_area=panoptic_min_stuff_area,
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False
        )

    def dense_submodules(self) -> tuple[str, ...]:
        """Attribute paths of the parts that convolve whole feature maps (see ``BlendMask``)."""
        return ("backbone", "fcos_head", "basis")

    def timing_stages(self) -> dict[str, tuple[nn.Module | tuple[nn.Module, str], ...]]:
        """This model's parts per ``bench speed`` stage (``dynaseg/bench/stages.py``): modules, or
        (module, method) for work done outside ``forward``."""
        return {
            "backbone+fpn": (self.backbone,),
            "head": (self.fcos_head,),
            "mask": (
                (self.top_layer, "context_factors"),
                (self.top_layer, "embeddings_at"),
                self.basis,
                self.predictor,
                *((self.panoptic_layer,) if self.panoptic_layer is not None else ()),
            ),
        }

    @property
    def ddp_unused_parameters(self) -> bool:
        """Without dynamic factors (Table 1's ablation) the top layer's context conv gets no gradient."""
        return self.basis.factors == "none"

    def forward(
        self, batch: Batch
    ) -> dict[str, Tensor] | list[Instances] | list[PanopticSegmentation]:
        if self.training:
            return self.losses(batch)
        outputs = self.predict_raw(batch.images, batch.image_sizes)
        return [
            dr1mask_postprocess(
                raw,
                maps,
                input_size=input_size,
                output_size=output_size,
                mask_threshold=self.mask_threshold,
                panoptic=self.panoptic_inference,
            )
            for (raw, maps), input_size, output_size in zip(
                outputs, batch.image_sizes, batch.original_sizes
            )
        ]

    def dense(
        self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]
    ) -> tuple[list[Tensor], FCOSOutputs, Tensor]:
        """Everything computed on whole maps: FCOS levels, FCOS outputs, F (B, C_F, Hp/4, Wp/4)."""
        features = self.backbone(
            normalize_images(images, image_sizes, self.pixel_mean, self.pixel_std)
        )
        levels = [features[f"p{i}"] for i in range(3, 3 + len(self.strides))]
        head = self.fcos_head(levels)
        context_source = {"box_tower": head.box_tower, "cls_tower": head.cls_tower, "fpn": levels}[
            self.top_layer.context_position
        ]
        basis = self.basis(
            levels,
            self.top_layer.context_factors(context_source),
            output_size=(images.shape[-2] // BASIS_STRIDE, images.shape[-1] // BASIS_STRIDE),
        )
        return levels, head, basis

    # ------------------------------------------------------------------ training

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """FCOS + instance mask (+ auxiliary semantic) (+ panoptic) losses."""
        assert batch.targets is not None, "training needs batch.targets"
        levels, head, basis = self.dense(batch.images, batch.image_sizes)
        pos = fcos_training(
            head,
            batch.targets,
            strides=self.strides,
            size_ranges=self.size_ranges,
            num_classes=self.num_classes,
            params=self.fcos_training,
        )
        losses = dict(pos.losses)
        embeddings = self.top_layer.embeddings_at(
            head.box_tower, pos.image_index, pos.location_index
        )  # (P, E)
        gt_boxes = torch.cat([t.boxes for t in batch.targets])
        gt_image = torch.cat(
            [torch.full((len(t),), i, device=gt_boxes.device) for i, t in enumerate(batch.targets)]
        )
        pooled = pool_bases(
            basis,
            boxes_with_batch_index(gt_boxes, gt_image),
            resolution=self.resolution,
            sampling_ratio=self.sampling_ratio,
            stride=BASIS_STRIDE,
        )  # (G, C_F, R, R)
        mask_targets = torch.cat(
            [crop_and_resize(t.masks, t.boxes, self.resolution) for t in batch.targets]
        )
        mask_logits = self.predictor(pooled, embeddings, pos.gt_index)  # (P, R, R)
        losses["loss_mask"] = self.mask_loss_weight * blender_mask_loss(
            mask_logits, mask_targets[pos.gt_index], pos.ctr_targets, pos.ctr_sum_avg
        )
        if self.semantic_head is not None:
            logits = self.semantic_head(levels[0])
            # With size divisibility 4, P3 can extend past the padded image: label that part ignored.
            covered = (logits.shape[-2] * self.strides[0], logits.shape[-1] * self.strides[0])
            sem = semantic_targets(
                [t.masks for t in batch.targets],
                [t.labels for t in batch.targets],
                covered,
                self.strides[0],
            )
            losses["loss_basis_sem"] = semantic_loss(logits, sem, self.semantic_loss_weight)
        if self.panoptic_layer is not None:
            losses["loss_panoptic"] = self._panoptic_loss(batch, basis, embeddings, pos)
        return losses

    def _panoptic_loss(
        self, batch: Batch, basis: Tensor, embeddings: Tensor, pos: FCOSPositives
    ) -> Tensor:
        """Eq. 9 in training: each GT instance's row is the mean of its positives' panoptic embeddings."""
        if batch.sem_seg is None:
            raise ValueError(
                "a panoptic model trains on panoptic data: the batch has no sem_seg "
                "(set data.panoptic_train_json / data.panoptic_train_dir)"
            )
        columns = self.predictor.panoptic_columns(embeddings)  # (P, C_F)
        num_gt = sum(len(t) for t in batch.targets)
        means, present = mean_embeddings_per_instance(columns, pos.gt_index, num_gt)
        logits, targets, first, first_row = [], [], 0, 0
        for i, t in enumerate(batch.targets):
            here = present[first : first + len(t)]
            rows = means[first_row : first_row + int(here.sum())]
            logits.append(self.panoptic_layer(basis[i], rows))
            targets.append(
                panoptic_targets(batch.sem_seg[i], t.masks, here, self.num_stuff, BASIS_STRIDE)
            )
            first, first_row = first + len(t), first_row + int(here.sum())
        return panoptic_loss(logits, targets, self.panoptic_loss_weight)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict_raw(
        self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]
    ) -> list[tuple[RawDetections, PanopticMaps | None]]:
        """Detections, box-relative masks and (panoptic model) Eq. 9's parts per image, before
        paste-back and grouping (traceable: ONNX export). images: (B, 3, Hp, Wp) RGB 0-255."""
        sizes = image_size_tensor(image_sizes, images.device)
        _, head, basis = self.dense(images, sizes)
        detections = fcos_detections(head, strides=self.strides, params=self.fcos_inference)
        image_index = torch.cat([torch.full_like(d.labels, i) for i, d in enumerate(detections)])
        embeddings = self.top_layer.embeddings_at(
            head.box_tower, image_index, torch.cat([d.location_index for d in detections])
        )  # (N, E)
        boxes = torch.cat([clip_boxes(d.boxes, size) for d, size in zip(detections, sizes)])
        pooled = pool_bases(
            basis,
            boxes_with_batch_index(boxes, image_index),
            resolution=self.resolution,
            sampling_ratio=self.sampling_ratio,
            stride=BASIS_STRIDE,
        )  # (N, C_F, R, R)
        n = boxes.shape[0]
        mask_probs = self.predictor(*guard_empty_rows(pooled, embeddings))[:n].sigmoid()
        raw = split_per_image(boxes, mask_probs, detections)
        if self.panoptic_layer is None:
            return [(r, None) for r in raw]
        columns = self.predictor.panoptic_columns(embeddings)  # (N, C_F)
        outputs, start = [], 0
        for i, r in enumerate(raw):
            end = start + r.labels.shape[0]
            features = basis[i]
            no_things = features.new_zeros((0, features.shape[0]))
            stuff = self.panoptic_layer(features, *guard_empty_rows(no_things))[: self.num_stuff]
            outputs.append((r, PanopticMaps(columns[start:end], features, stuff)))
            start = end
        return outputs


@torch.no_grad()
def dr1mask_postprocess(
    raw: RawDetections,
    maps: PanopticMaps | None,
    *,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_threshold: float,
    panoptic: PanopticInference,
) -> Instances | PanopticSegmentation:
    """One image's raw outputs → Instances at ``output_size`` or, with ``maps``, the panoptic result.

    Panoptic (Eq. 9 at test time): detections scoring at least ``panoptic.score_threshold`` are
    grouped into instances (``group_duplicate_detections``), each instance's row is the mean of its
    detections' columns, thing logits = rows × F after the stuff logits, then
    ``panoptic_postprocess``. The result's ``instances`` hold every detection (for mask AP).
    """
    # Drop boxes that vanish at the output size first, so rows stay aligned with the columns.
    keep = nonempty_boxes(
        clip_boxes_to_image(scale_boxes(raw.boxes, input_size, output_size), output_size)
    )
    instances = blendmask_postprocess(
        raw.boxes[keep],
        raw.scores[keep],
        raw.labels[keep],
        raw.mask_probs[keep],
        input_size=input_size,
        output_size=output_size,
        mask_threshold=mask_threshold,
    )
    if maps is None:
        return instances
    things = (instances.scores >= panoptic.score_threshold).nonzero().squeeze(1)
    kept, group = group_duplicate_detections(
        instances.boxes[things], instances.scores[things], panoptic.group_iou
    )
    columns = maps.columns[keep][things]
    joined = group >= 0
    rows, _ = mean_embeddings_per_instance(columns[joined], group[joined], len(kept))
    features = maps.features
    thing_logits = panoptic_logits(features, features.new_zeros((0, features.shape[0])), rows)
    result = panoptic_postprocess(
        torch.cat([maps.stuff_logits, thing_logits]),
        instances[things[kept]],
        num_stuff=panoptic.num_stuff,
        stride=BASIS_STRIDE,
        input_size=input_size,
        min_stuff_area=panoptic.min_stuff_area,
        restrict_to_boxes=panoptic.restrict_to_boxes,
    )
    return dataclasses.replace(result, instances=instances)  # every detection, for mask AP
