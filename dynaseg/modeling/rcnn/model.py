"""Two-stage detector (Mask R-CNN R50-FPN layout) with a pluggable mask branch.

ResNet-FPN (P2-P6) → RPN → sampled / decoded RoIs → Fast R-CNN box head → mask branch on the
positive RoIs (training) or on the final detections (inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from dynaseg.layers.dynamic_shapes import image_size_tensor
from dynaseg.layers.roi_align import boxes_to_rois
from dynaseg.modeling.backbone.fpn import ResNetFPN
from dynaseg.modeling.preprocess import normalize_images
from dynaseg.modeling.rcnn.box_head import BoxHead, ProposalSamples
from dynaseg.modeling.rcnn.rpn import RPN
from dynaseg.structures import Batch, Instances
from dynaseg.structures.detections import RawDetections
from dynaseg.structures.masks import paste_masks, paste_masks_torchvision, scale_boxes

__all__ = ["RCNNInstances", "TwoStageDetector", "rcnn_postprocess"]


@dataclass(kw_only=True)
class RCNNInstances(Instances):
    """``Instances`` plus the mask side r_i the mask branch used for each detection.

    Attributes:
        mask_resolutions: (N,) int64 (28 for Mask R-CNN; 14/28/56/112 for DynaMask), or None.
    """

    mask_resolutions: Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_resolutions is not None and self.mask_resolutions.shape[0] != len(self):
            raise ValueError(
                f"mask_resolutions has length {self.mask_resolutions.shape[0]}, boxes has {len(self)}"
            )


class TwoStageDetector(nn.Module):
    """Mask R-CNN-style detector; the mask branch is any ``MaskBranch`` (FCN head, DynaMask, ...).

    ``forward(batch)`` returns a dict of weighted ``loss_*`` tensors in training
    (``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg`` and the mask branch's terms) and a
    list of :class:`RCNNInstances` at each image's original size (full-image bool masks) in evaluation.

    Args:
        backbone: ResNet-FPN with ``layout="p2p6"``.
        rpn: proposals from P2-P6.
        box_head: Fast R-CNN head holding its sampling, loss and inference parameters.
        mask_branch: an ``nn.Module`` implementing ``MaskBranch`` (``losses``, ``predict``).
        num_classes: C (no background); must match the heads.
        max_mask_rois_per_image: cap on positive RoIs per image fed to the mask branch in training
            (a random subset); 0 = all positives.
        mask_threshold: paste-back threshold on mask probabilities.
        mask_paste: "aligned" (``paste_masks``: exact box coordinates) or "torchvision"
            (``paste_masks_torchvision``: boxes rounded to pixels, as torchvision's Mask R-CNN).
        pixel_mean, pixel_std: RGB normalisation (0-255 scale).
    """

    def __init__(
        self,
        *,
        backbone: ResNetFPN,
        rpn: RPN,
        box_head: BoxHead,
        mask_branch: nn.Module,
        num_classes: int,
        max_mask_rois_per_image: int = 0,
        mask_threshold: float = 0.5,
        mask_paste: Literal["aligned", "torchvision"] = "aligned",
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        if getattr(backbone, "layout", None) != "p2p6":
            raise ValueError("TwoStageDetector needs a ResNetFPN with layout='p2p6'")
        if box_head.num_classes != num_classes:
            raise ValueError(f"box_head has {box_head.num_classes} classes, detector {num_classes}")
        self.backbone, self.rpn, self.box_head, self.mask_branch = (
            backbone,
            rpn,
            box_head,
            mask_branch,
        )
        self.num_classes = num_classes
        self.max_mask_rois_per_image = max_mask_rois_per_image
        self.mask_threshold, self.mask_paste = mask_threshold, mask_paste
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False
        )

    def dense_submodules(self) -> tuple[str, ...]:
        """Attribute paths of the parts that convolve whole feature maps (see ``BlendMask``)."""
        return ("backbone", "rpn.rpn.head")

    def timing_stages(self) -> dict[str, tuple[nn.Module | tuple[nn.Module, str], ...]]:
        """This model's parts per ``bench speed`` stage (``dynaseg/bench/stages.py``): modules, or
        (module, method) for work done outside ``forward``. Box decoding and NMS count as ``head``; the mask branch's RoIAlign as ``mask``."""
        return {
            "backbone+fpn": (self.backbone,),
            "head": (self.rpn, self.box_head, (self.box_head, "inference")),
            "mask": ((self.mask_branch, "predict"),),
        }

    @property
    def ddp_unused_parameters(self) -> bool:
        """DynaMask's phase 1 leaves its Mask Switch Module without a gradient."""
        return getattr(self.mask_branch, "msm", None) is not None

    def mask_gmac_per_resolution(self) -> dict[int, float]:
        """Mask-branch GMAC spent on one instance at each mask side, per-instance overheads included."""
        overhead = self.mask_branch.overhead_gmac()
        return {side: g + overhead for side, g in self.mask_branch.gmac_per_resolution().items()}

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[RCNNInstances]:
        if self.training:
            return self.losses(batch)
        raw = self.predict_raw(batch.images, batch.image_sizes)
        return [
            rcnn_postprocess(
                r,
                input_size=input_size,
                output_size=output_size,
                mask_threshold=self.mask_threshold,
                paste=self.mask_paste,
            )
            for r, input_size, output_size in zip(raw, batch.image_sizes, batch.original_sizes)
        ]

    def normalize(self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]) -> Tensor:
        """(B, 3, Hp, Wp) 0-255 → normalised, padding 0."""
        return normalize_images(images, image_sizes, self.pixel_mean, self.pixel_std)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        assert batch.targets is not None, "training needs batch.targets"
        features = self.backbone(
            self.normalize(batch.images, batch.image_sizes)
        )  # {"p2": (B, F, Hp/4, Wp/4), ...}
        proposals, rpn_losses = self.rpn(features, batch.images, batch.image_sizes, batch.targets)
        samples = self.box_head.sample(proposals, batch.targets)  # S RoIs, no gradient
        class_logits, box_deltas = self.box_head(features, samples.rois)  # (S, C+1), (S, 4(C+1))
        positive = self._mask_roi_index(samples)  # (P,)
        mask_losses = self.mask_branch.losses(
            features=features,
            rois=samples.rois[positive],
            labels=samples.labels[positive],
            gt_masks=[t.masks for t in batch.targets],
            gt_index=samples.gt_index[positive],
        )
        return {
            **rpn_losses,
            **self.box_head.losses(class_logits, box_deltas, samples),
            **mask_losses,
        }

    def _mask_roi_index(self, samples: ProposalSamples) -> Tensor:
        """Indices of foreground samples for the mask branch, at most ``max_mask_rois_per_image`` per image."""
        positive = (samples.labels < self.num_classes).nonzero().squeeze(1)
        cap = self.max_mask_rois_per_image
        if cap <= 0:
            return positive
        image = samples.rois[positive, 0]
        kept = []
        for b in image.unique():
            index = positive[image == b]
            kept.append(
                index[torch.randperm(len(index), device=index.device)[:cap]]
                if len(index) > cap
                else index
            )
        return torch.cat(kept) if kept else positive

    @torch.no_grad()
    def predict_raw(
        self, images: Tensor, image_sizes: Tensor | list[tuple[int, int]]
    ) -> list[RawDetections]:
        """Detections and box-relative masks per image before paste-back (traceable: ONNX export).

        images: (B, 3, Hp, Wp) RGB 0-255, padded; image_sizes: valid (h, w) per image.
        """
        sizes = image_size_tensor(image_sizes, images.device)
        features = self.backbone(self.normalize(images, sizes))
        proposals, _ = self.rpn(features, images, sizes)
        class_logits, box_deltas = self.box_head(features, boxes_to_rois(proposals))
        detections = self.box_head.inference(class_logits, box_deltas, proposals, sizes)
        masks = self.mask_branch.predict(
            features=features,
            rois=boxes_to_rois([d.boxes for d in detections]),
            labels=torch.cat([d.labels for d in detections]),
            image_sizes=sizes,
        )
        results, start = [], 0
        for det in detections:
            end = start + det.labels.shape[0]
            results.append(
                RawDetections(*det, masks.mask_probs[start:end], masks.resolutions[start:end])
            )
            start = end
        return results


def rcnn_postprocess(
    raw: RawDetections,
    *,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_threshold: float,
    paste: Literal["aligned", "torchvision"] = "aligned",
) -> RCNNInstances:
    """Rescale one image's detections to its original size and paste their masks.

    raw: N boxes clipped to ``input_size``, masks ``mask_probs[i, :r_i, :r_i]`` → RCNNInstances with
    (N', H, W) bool masks at ``output_size`` (boxes empty after rescaling are dropped). Masks of one
    resolution are pasted in one ``paste_masks`` call.
    """
    boxes = clip_boxes_to_image(scale_boxes(raw.boxes, input_size, output_size), output_size)
    keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().squeeze(1)
    boxes, resolutions, probs = boxes[keep], raw.mask_resolutions[keep], raw.mask_probs[keep]
    masks = torch.zeros((len(keep), *output_size), dtype=torch.bool, device=boxes.device)
    for r in resolutions.unique().tolist():
        group = (resolutions == r).nonzero().squeeze(1)
        paste_fn = paste_masks if paste == "aligned" else paste_masks_torchvision
        masks[group] = paste_fn(probs[group, :r, :r], boxes[group], output_size, mask_threshold)
    return RCNNInstances(
        image_size=tuple(output_size),
        boxes=boxes,
        labels=raw.labels[keep],
        scores=raw.scores[keep],
        masks=masks,
        mask_resolutions=resolutions,
    )
