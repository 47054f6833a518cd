"""BlendMask meta-architecture: ResNet-FPN → FCOS + attention (top) + bases (bottom) → blender."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from dynaseg.layers.dynamic_shapes import guard_empty_rows, image_size_tensor
from dynaseg.modeling.blendmask.attention import AttentionTopLayer
from dynaseg.modeling.blendmask.basis import BasisModule
from dynaseg.modeling.fcos.head import FCOSOutputs
from dynaseg.modeling.one_stage.blender import blend, blender_mask_loss, pool_bases
from dynaseg.modeling.one_stage.detector import OneStageArgs, OneStageSegmenter
from dynaseg.modeling.one_stage.postprocess import one_stage_postprocess, split_per_image
from dynaseg.structures import Batch, Instances
from dynaseg.structures.detections import RawDetections

__all__ = ["BlendMask"]


class BlendMask(OneStageSegmenter):
    """BlendMask on FCOS (Chen et al., CVPR 2020).

    ``forward(batch)`` returns a dict of weighted ``loss_*`` tensors in training and a list of
    :class:`Instances` at each image's original size (full-image bool masks) in evaluation.

    Args:
        attention: top layer on the box tower (K·M·M logits per location).
        basis: bottom module giving K bases at stride 4 from P3-P5 (and P2 with its stride-4 skip).
        common: ``OneStageArgs``; the backbone gives P3-P7 (P2-P6 when ``fcos.strides`` start at
            4; P2-P7 for a basis skip on P3-P7 FCOS), ``resolution`` is the blender's R.
    """

    def __init__(
        self,
        *,
        attention: AttentionTopLayer,
        basis: BasisModule,
        **common: Unpack[OneStageArgs],
    ) -> None:
        super().__init__(**common)
        self.attention, self.basis = attention, basis

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

    def dense(
        self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]
    ) -> tuple[dict[str, Tensor], FCOSOutputs, Tensor]:
        """Everything computed on whole maps: FPN features, FCOS outputs, bases (B, K, Hp/4, Wp/4)."""
        features = self.backbone(self.normalize(images, image_sizes))
        head = self.fcos_head(self.fcos_levels(features))
        p2 = features["p2"] if self.basis.skip is not None else None
        return features, head, self.basis(self.basis_levels(features), p2)

    def fcos_levels(self, features: dict[str, Tensor]) -> list[Tensor]:
        """The pyramid levels the FCOS head runs on: P3-P7, or P2-P6 with a stride-4 first level."""
        first = self.strides[0].bit_length() - 1
        return [features[f"p{first + i}"] for i in range(len(self.strides))]

    def basis_levels(self, features: dict[str, Tensor]) -> list[Tensor]:
        """The bottom module's inputs: P3, P4, ... (stride-4 bases), whatever levels FCOS uses."""
        return [features[f"p{3 + i}"] for i in range(len(self.basis.refine))]

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        assert batch.targets is not None, "training needs batch.targets"
        features, head, bases = self.dense(batch.images, batch.image_sizes)
        pos = self.fcos_positives(head, batch.targets)
        losses = dict(pos.losses)
        attention = self.attention(
            head.box_tower, pos.image_index, pos.location_index
        )  # (P, K, M, M)
        pooled = pool_bases(
            bases,
            self.gt_rois(batch.targets),
            resolution=self.resolution,
            sampling_ratio=self.sampling_ratio,
        )  # (G, K, R, R)
        mask_targets = self.gt_mask_targets(batch.targets)
        mask_logits = blend(pooled[pos.gt_index], attention)
        losses["loss_mask"] = self.mask_loss_weight * blender_mask_loss(
            mask_logits, mask_targets[pos.gt_index], pos.ctr_targets, pos.ctr_sum_avg
        )
        if self.semantic_head is not None:
            losses["loss_basis_sem"] = self.semantic_loss(features["p3"], batch.targets)
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
        kept = self.detections(head, sizes)
        attention = self.attention(
            head.box_tower, kept.image_index, kept.location_index
        )  # (N, K, M, M)
        pooled = pool_bases(
            bases, kept.rois, resolution=self.resolution, sampling_ratio=self.sampling_ratio
        )  # (N, K, R, R)
        n = kept.boxes.shape[0]
        mask_probs = blend(*guard_empty_rows(pooled, attention))[:n].sigmoid()
        return split_per_image(kept.boxes, mask_probs, kept.per_image)

    def postprocess(
        self, output: RawDetections, *, input_size: tuple[int, int], output_size: tuple[int, int]
    ) -> Instances:
        return one_stage_postprocess(
            *output[:4],
            input_size=input_size,
            output_size=output_size,
            mask_threshold=self.mask_threshold,
        )
