"""DR1Mask meta-architecture (Chen, Shen, Tian 2020): FCOS + top layer + DR1Basis + instance predictor,
plus the one-layer unified panoptic head when built with stuff classes."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image
from typing_extensions import Unpack

from dynaseg.layers.dynamic_shapes import guard_empty_rows, image_size_tensor
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
from dynaseg.modeling.fcos.detector import FCOSPositives
from dynaseg.modeling.fcos.head import FCOSOutputs
from dynaseg.modeling.one_stage.blender import blender_mask_loss, pool_bases
from dynaseg.modeling.one_stage.detector import OneStageArgs, OneStageSegmenter
from dynaseg.modeling.one_stage.postprocess import (
    nonempty_boxes,
    one_stage_postprocess,
    split_per_image,
)
from dynaseg.structures import Batch, Instances
from dynaseg.structures.detections import PanopticMaps, RawDetections
from dynaseg.structures.masks import scale_boxes
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


class DR1Mask(OneStageSegmenter):
    """DR1Mask for instance or (with ``panoptic_layer``) panoptic segmentation.

    ``forward(batch)`` returns weighted ``loss_*`` tensors in training; in evaluation a list of
    :class:`Instances` (instance model) or of :class:`PanopticSegmentation` whose ``instances`` are
    the thing detections (panoptic model), at each image's original size.

    Args:
        top_layer: embeddings and DR1Basis context from the box tower (Eq. 5).
        basis: DR1Basis giving F at stride 4 (Eq. 6). predictor: instance prediction (Eq. 7-8).
        panoptic_layer: static stuff rows of the panoptic layer (Eq. 9), or None.
        panoptic_loss_weight: weight of Eq. 9's loss.
        panoptic_score_threshold, panoptic_group_iou, panoptic_restrict_to_boxes, panoptic_min_stuff_area:
        panoptic inference (see ``DR1HeadConfig``).
        common: ``OneStageArgs``; the backbone gives P3-P7, ``resolution`` is the RoIAlign of F.
    """

    def __init__(
        self,
        *,
        top_layer: DR1TopLayer,
        basis: DR1Basis,
        predictor: InstancePredictor,
        panoptic_layer: PanopticLayer | None,
        panoptic_loss_weight: float,
        panoptic_score_threshold: float,
        panoptic_group_iou: float,
        panoptic_restrict_to_boxes: bool,
        panoptic_min_stuff_area: int,
        **common: Unpack[OneStageArgs],
    ) -> None:
        super().__init__(**common)
        self.top_layer, self.basis, self.predictor = top_layer, basis, predictor
        self.panoptic_layer = panoptic_layer
        self.num_stuff = 0 if panoptic_layer is None else panoptic_layer.stuff_weight.shape[0]
        self.panoptic_loss_weight = panoptic_loss_weight
        self.panoptic_inference = PanopticInference(
            num_stuff=self.num_stuff,
            score_threshold=panoptic_score_threshold,
            group_iou=panoptic_group_iou,
            restrict_to_boxes=panoptic_restrict_to_boxes,
            min_stuff_area=panoptic_min_stuff_area,
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

    def dense(
        self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]
    ) -> tuple[list[Tensor], FCOSOutputs, Tensor]:
        """Everything computed on whole maps: FCOS levels, FCOS outputs, F (B, C_F, Hp/4, Wp/4)."""
        features = self.backbone(self.normalize(images, image_sizes))
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
        pos = self.fcos_positives(head, batch.targets)
        losses = dict(pos.losses)
        embeddings = self.top_layer.embeddings_at(
            head.box_tower, pos.image_index, pos.location_index
        )  # (P, E)
        pooled = pool_bases(
            basis,
            self.gt_rois(batch.targets),
            resolution=self.resolution,
            sampling_ratio=self.sampling_ratio,
            stride=BASIS_STRIDE,
        )  # (G, C_F, R, R)
        mask_targets = self.gt_mask_targets(batch.targets)
        mask_logits = self.predictor(pooled, embeddings, pos.gt_index)  # (P, R, R)
        losses["loss_mask"] = self.mask_loss_weight * blender_mask_loss(
            mask_logits, mask_targets[pos.gt_index], pos.ctr_targets, pos.ctr_sum_avg
        )
        if self.semantic_head is not None:
            losses["loss_basis_sem"] = self.semantic_loss(levels[0], batch.targets)
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
        kept = self.detections(head, sizes)
        embeddings = self.top_layer.embeddings_at(
            head.box_tower, kept.image_index, kept.location_index
        )  # (N, E)
        pooled = pool_bases(
            basis,
            kept.rois,
            resolution=self.resolution,
            sampling_ratio=self.sampling_ratio,
            stride=BASIS_STRIDE,
        )  # (N, C_F, R, R)
        n = kept.boxes.shape[0]
        mask_probs = self.predictor(*guard_empty_rows(pooled, embeddings))[:n].sigmoid()
        raw = split_per_image(kept.boxes, mask_probs, kept.per_image)
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

    def postprocess(
        self,
        output: tuple[RawDetections, PanopticMaps | None],
        *,
        input_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> Instances | PanopticSegmentation:
        raw, maps = output
        return dr1mask_postprocess(
            raw,
            maps,
            input_size=input_size,
            output_size=output_size,
            mask_threshold=self.mask_threshold,
            panoptic=self.panoptic_inference,
        )


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
    instances = one_stage_postprocess(
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
