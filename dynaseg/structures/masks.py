"""Mask geometry: crop GT masks to boxes, paste box-relative masks back into images."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from dynaseg.layers.roi_align import roi_align_aligned

__all__ = ["crop_and_resize", "roi_mask_targets", "paste_masks", "scale_boxes", "clip_boxes"]


def crop_and_resize(masks: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Rasterise each full-image mask inside its own box at size×size.

    masks: (M, H, W) bool; boxes: (M, 4) XYXY pixels → (M, size, size) float in {0, 1}
    (RoIAlign, aligned, of the binary mask, thresholded at 0.5).
    """
    if masks.shape[0] == 0:
        return masks.new_zeros((0, size, size), dtype=torch.float32)
    index = torch.arange(masks.shape[0], device=masks.device, dtype=boxes.dtype)
    rois = torch.cat([index[:, None], boxes], dim=1)
    pooled = roi_align_aligned(masks[:, None].float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=0)
    return (pooled[:, 0] >= 0.5).float()


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip (N, 4) XYXY boxes to an (h, w) image."""
    h, w = image_size
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                        boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Rescale XYXY boxes from an (h, w) image to another (h', w')."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def paste_masks(mask_probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Paste box-relative probability maps into full images.

    mask_probs: (N, R, R) in [0, 1], each covering its box exactly; boxes: (N, 4) XYXY pixels of
    the target image → (N, H, W) bool. Each mask is resampled bilinearly (pixel centres) only over
    the pixels its box touches.
    """
    h, w = image_size
    out = torch.zeros((mask_probs.shape[0], h, w), dtype=torch.bool, device=mask_probs.device)
    for i, (probs, box) in enumerate(zip(mask_probs, boxes.tolist())):
        x0, y0, x1, y1 = box
        px0, py0 = max(int(x0), 0), max(int(y0), 0)
        px1, py1 = min(int(x1) + 1, w), min(int(y1) + 1, h)
        if px1 <= px0 or py1 <= py0 or x1 <= x0 or y1 <= y0:
            continue
        xs = (torch.arange(px0, px1, device=probs.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        ys = (torch.arange(py0, py1, device=probs.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]        # (1, h', w', 2)
        crop = F.grid_sample(probs[None, None].float(), grid, align_corners=False)[0, 0]
        out[i, py0:py1, px0:px1] = crop >= threshold
    return out


def roi_mask_targets(gt_masks: list[Tensor], rois: Tensor, gt_index: Tensor, size: int) -> Tensor:
    """Binary mask targets of RoIs: each RoI's matched GT mask sampled inside the RoI box at size×size.

    Mask R-CNN's convention: the *proposal* box (not the GT box) defines the crop.
    gt_masks: per image (M_i, h_i, w_i) bool; rois: (P, 5) [b, x0, y0, x1, y1]; gt_index: (P,)
    index into image b's masks → (P, size, size) float in {0, 1}.
    """
    out = rois.new_zeros((rois.shape[0], size, size))
    for b, masks in enumerate(gt_masks):
        sel = (rois[:, 0] == b).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        per_mask = torch.cat([gt_index[sel, None].to(rois.dtype), rois[sel, 1:]], dim=1)   # rows index masks
        pooled = roi_align_aligned(masks[:, None].float(), per_mask, output_size=size, spatial_scale=1.0,
                                   sampling_ratio=0)
        out[sel] = (pooled[:, 0] >= 0.5).float()
    return out
