"""The one-stage instance segmenters' common part: FCOS on a ResNet-FPN plus a RoI-pooled mask.

BlendMask and DR1Mask subclass ``OneStageSegmenter`` (detectron2's ``DenseDetector`` plays this
part for its FCOS and RetinaNet): it owns the backbone, the FCOS head with its parameters, the
optional auxiliary semantic head and the input normalisation, and gives the subclasses the FCOS
positives in training, the decoded detections at inference, and the ground-truth side of the mask
loss. Subclasses implement ``dense``, ``losses``, ``predict_raw`` and ``postprocess``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from typing_extensions import TypedDict, Unpack

from dynaseg.layers.dynamic_shapes import clip_boxes, image_size_tensor
from dynaseg.layers.roi_align import boxes_to_rois
from dynaseg.modeling.backbone.fpn import ResNetFPN
from dynaseg.modeling.fcos.detector import (
    FCOSInference,
    FCOSPositives,
    FCOSTraining,
    fcos_detections,
    fcos_training,
)
from dynaseg.modeling.fcos.head import FCOSHead, FCOSOutputs
from dynaseg.modeling.fcos.inference import FCOSDetections
from dynaseg.modeling.fcos.targets import level_size_ranges
from dynaseg.modeling.one_stage.semantic import SemanticHead, semantic_loss, semantic_targets
from dynaseg.modeling.preprocess import normalize_images
from dynaseg.structures import Batch, Instances
from dynaseg.structures.masks import crop_and_resize

__all__ = ["FCOSParams", "KeptDetections", "OneStageArgs", "OneStageSegmenter"]


class FCOSParams(NamedTuple):
    """FCOS's levels (strides, sizes of interest), targets and losses, and decoding; locations at
    ``location_offset`` strides into their cell (0.5: centres; 0: torchvision's corners)."""

    strides: tuple[int, ...]
    sizes_of_interest: tuple[int, ...]
    training: FCOSTraining
    inference: FCOSInference
    location_offset: float = 0.5


class KeptDetections(NamedTuple):
    """The decoded detections of a batch, all images concatenated in image order (N rows)."""

    per_image: list[FCOSDetections]  # boxes not clipped, scores, labels, location index
    image_index: Tensor  # (N,) int64
    location_index: Tensor  # (N,) int64 into the image's concatenated locations
    boxes: Tensor  # (N, 4) XYXY clipped to each image's valid size
    rois: Tensor  # (N, 5) [image index, x0, y0, x1, y1]


class OneStageArgs(TypedDict):
    """The constructor arguments every one-stage model takes.

    backbone: ResNet-FPN. fcos_head: FCOS towers and predictors on the levels of ``fcos.strides``.
    semantic_head: auxiliary thing-semantic head on P3, or None. num_classes: C.
    fcos: FCOS's levels and parameters. resolution, sampling_ratio: RoIAlign side R of the mask and
    samples per bin. mask_loss_weight, semantic_loss_weight: loss weights. mask_threshold:
    paste-back threshold. pixel_mean, pixel_std: RGB normalisation (0-255 scale).
    """

    backbone: ResNetFPN
    fcos_head: FCOSHead
    semantic_head: SemanticHead | None
    num_classes: int
    fcos: FCOSParams
    resolution: int
    sampling_ratio: int
    mask_loss_weight: float
    semantic_loss_weight: float
    mask_threshold: float
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]


class OneStageSegmenter(nn.Module):
    """FCOS + a mask from RoI-pooled dense features (see the module docstring); keyword arguments
    as ``OneStageArgs``.

    ``forward(batch)`` returns a dict of weighted ``loss_*`` tensors in training, and in evaluation
    ``postprocess`` of each image's ``predict_raw`` output at its original size.
    """

    def __init__(self, **args: Unpack[OneStageArgs]) -> None:
        super().__init__()
        self.backbone, self.fcos_head = args["backbone"], args["fcos_head"]
        self.semantic_head = args["semantic_head"]
        self.num_classes = args["num_classes"]
        fcos = args["fcos"]
        self.strides, self.size_ranges = (
            list(fcos.strides),
            level_size_ranges(fcos.sizes_of_interest),
        )
        self.fcos_training, self.fcos_inference = fcos.training, fcos.inference
        self.location_offset = fcos.location_offset
        self.resolution, self.sampling_ratio = args["resolution"], args["sampling_ratio"]
        self.mask_loss_weight = args["mask_loss_weight"]
        self.semantic_loss_weight = args["semantic_loss_weight"]
        self.mask_threshold = args["mask_threshold"]
        pixel_mean, pixel_std = args["pixel_mean"], args["pixel_std"]
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[Any]:
        if self.training:
            return self.losses(batch)
        outputs = self.predict_raw(batch.images, batch.image_sizes)
        return [
            self.postprocess(out, input_size=input_size, output_size=output_size)
            for out, input_size, output_size in zip(
                outputs, batch.image_sizes, batch.original_sizes
            )
        ]

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict_raw(self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]) -> list[Any]:
        """Per image, everything before paste-back (traceable for one image: ONNX export)."""
        raise NotImplementedError

    def postprocess(
        self, output: Any, *, input_size: tuple[int, int], output_size: tuple[int, int]
    ) -> Any:
        """One image's ``predict_raw`` output → its result at ``output_size``."""
        raise NotImplementedError

    def normalize(self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]) -> Tensor:
        """(B, 3, Hp, Wp) 0-255 → normalised, padding 0."""
        return normalize_images(images, image_sizes, self.pixel_mean, self.pixel_std)

    def fcos_positives(self, head: FCOSOutputs, targets: list[Instances]) -> FCOSPositives:
        """FCOS's target assignment and losses on the batch; the positives the mask is trained at."""
        return fcos_training(
            head,
            targets,
            strides=self.strides,
            size_ranges=self.size_ranges,
            num_classes=self.num_classes,
            params=self.fcos_training,
            location_offset=self.location_offset,
        )

    def detections(
        self, head: FCOSOutputs, image_sizes: Tensor | list[tuple[int, int]]
    ) -> KeptDetections:
        """Decode every image and clip its boxes to its valid (h, w)."""
        sizes = image_size_tensor(image_sizes, head.cls_logits[0].device)
        per_image = fcos_detections(
            head,
            strides=self.strides,
            params=self.fcos_inference,
            location_offset=self.location_offset,
            image_sizes=sizes,
        )
        rois = boxes_to_rois([clip_boxes(d.boxes, size) for d, size in zip(per_image, sizes)])
        return KeptDetections(
            per_image,
            rois[:, 0].long(),
            torch.cat([d.location_index for d in per_image]),
            rois[:, 1:],
            rois,
        )

    def gt_rois(self, targets: list[Instances]) -> Tensor:
        """Every ground-truth box of the batch as a RoI: (G, 5) [image index, x0, y0, x1, y1]."""
        return boxes_to_rois([t.boxes for t in targets])

    def gt_mask_targets(self, targets: list[Instances]) -> Tensor:
        """Every ground-truth mask cropped to its box and resized to R × R: (G, R, R)."""
        return torch.cat([crop_and_resize(t.masks, t.boxes, self.resolution) for t in targets])

    def semantic_loss(self, p3: Tensor, targets: list[Instances]) -> Tensor:
        """The auxiliary thing-semantic loss on P3 (cells beyond the padded image are ignored)."""
        logits = self.semantic_head(p3)
        stride = 8
        covered = (logits.shape[-2] * stride, logits.shape[-1] * stride)
        sem = semantic_targets(
            [t.masks for t in targets], [t.labels for t in targets], covered, stride
        )
        return semantic_loss(logits, sem, self.semantic_loss_weight)
