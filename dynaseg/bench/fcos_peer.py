"""torchvision's FCOS as an independent reference for our FCOS (issue 16).

``TorchvisionFCOS`` runs ``torchvision.models.detection.FCOS`` — its own head, anchor-point
matching, losses and decoding — on our ResNet-FPN (P3-P7, P6/P7 from P5, as torchvision's
``fcos_resnet50_fpn``), behind our model contract: ``forward(batch)`` returns ``loss_*`` terms in
training and box-only :class:`Instances` at the original image sizes in evaluation. So the trainer,
data pipeline, schedule and COCO evaluation are exactly those of the model it is compared with, and
only the detector differs. ``dynaseg bench fcos-peer --config blendmask_r18_synth_cpu`` trains it.

torchvision's design, as opposed to AdelaiDet's (both read from their code):
- anchor points at the cell corner (j·s, i·s), not its centre (j·s + s/2);
- size ranges from the anchor size (= stride): [4s, 8s] per level, i.e. (64, 128, 256, 512)
  for strides 8…128, whatever ``fcos.sizes_of_interest`` says;
- GIoU not weighted by centerness, normalised by the number of positives;
- the candidate threshold on p_cls alone (AdelaiDet's BlendMask: on p_cls·p_ctr).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.fcos import FCOSHead as TorchvisionFCOSHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import clip_boxes_to_image

from dynaseg.config.overrides import ConfigError
from dynaseg.config.schema import BlendMaskConfig, DR1MaskConfig
from dynaseg.modeling.backbone.fpn import ResNetFPN
from dynaseg.structures import Batch, Instances
from dynaseg.structures.masks import scale_boxes

__all__ = ["TorchvisionFCOS", "build_torchvision_fcos"]

_LOSS_NAMES = {
    "classification": "loss_fcos_cls",
    "bbox_regression": "loss_fcos_loc",
    "bbox_ctrness": "loss_fcos_ctr",
}


class _NoResize(GeneralizedRCNNTransform):
    """torchvision's normalise-and-pad transform without its resize: our loader has resized already."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        return image, target


class TorchvisionFCOS(nn.Module):
    """torchvision's FCOS detector on a dynaseg backbone (boxes only).

    Args:
        backbone: ResNet-FPN with the P3-P7 layout.
        num_classes: C (labels 0..C-1; torchvision's sigmoid classifier needs no background class).
        num_convs: depth of each tower.
        center_sampling_radius: in anchor sizes (= strides).
        score_threshold: candidate threshold on p_cls. nms_threshold: class-aware NMS IoU.
        pre_nms_topk: candidates per level. max_detections: per image.
        pixel_mean, pixel_std: RGB normalisation (0-255 scale).
        size_divisibility: padding multiple of the batch.
    """

    def __init__(
        self,
        *,
        backbone: ResNetFPN,
        num_classes: int,
        num_convs: int,
        center_sampling_radius: float,
        score_threshold: float,
        nms_threshold: float,
        pre_nms_topk: int,
        max_detections: int,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float],
        size_divisibility: int,
    ) -> None:
        super().__init__()
        if backbone.layout != "p3p7":
            raise ValueError("torchvision's FCOS needs the P3-P7 backbone layout")
        head = TorchvisionFCOSHead(backbone.out_channels, 1, num_classes, num_convs=num_convs)
        self.detector = FCOS(
            backbone,
            num_classes,
            head=head,
            center_sampling_radius=center_sampling_radius,
            score_thresh=score_threshold,
            nms_thresh=nms_threshold,
            detections_per_img=max_detections,
            topk_candidates=pre_nms_topk,
        )
        self.detector.transform = _NoResize(
            1,
            1,
            [m / 255 for m in pixel_mean],
            [s / 255 for s in pixel_std],
            size_divisible=size_divisibility,
        )

    ddp_unused_parameters = False  # every parameter gets a gradient in every step

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[Instances]:
        images = [batch.images[i, :, :h, :w] / 255 for i, (h, w) in enumerate(batch.image_sizes)]
        if self.training:
            assert batch.targets is not None, "training needs batch.targets"
            targets = [{"boxes": t.boxes, "labels": t.labels} for t in batch.targets]
            losses = self.detector(images, targets)
            return {_LOSS_NAMES[k]: v for k, v in losses.items()}
        out = []
        for det, size, original in zip(
            self.detector(images), batch.image_sizes, batch.original_sizes
        ):
            boxes = clip_boxes_to_image(scale_boxes(det["boxes"], size, original), original)
            out.append(
                Instances(
                    image_size=original, boxes=boxes, labels=det["labels"], scores=det["scores"]
                )
            )
        return out


def build_torchvision_fcos(cfg: BlendMaskConfig | DR1MaskConfig) -> TorchvisionFCOS:
    """torchvision's FCOS with the backbone, tower depth and inference settings of a one-stage config
    (``BlendMaskConfig`` or ``DR1MaskConfig``)."""
    from dynaseg.modeling.build import build_backbone

    if cfg.fcos.strides[:1] != (8,):
        raise ConfigError(
            "bench fcos-peer builds torchvision's FCOS on P3-P7; model.fcos.strides must start at 8"
        )
    if cfg.backbone.fpn_channels % 32:  # torchvision's towers use GroupNorm(32, channels)
        raise ConfigError(
            f"model.backbone.fpn_channels={cfg.backbone.fpn_channels}: torchvision's FCOS head "
            "needs a multiple of 32 (its towers use 32-group GroupNorm)"
        )
    f = cfg.fcos
    return TorchvisionFCOS(
        backbone=build_backbone(cfg),
        num_classes=cfg.num_classes,
        num_convs=f.num_convs,
        center_sampling_radius=f.center_sampling_radius,
        score_threshold=f.score_threshold,
        nms_threshold=f.nms_threshold,
        pre_nms_topk=f.pre_nms_topk,
        max_detections=f.max_detections,
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
        size_divisibility=cfg.size_divisibility,
    )
