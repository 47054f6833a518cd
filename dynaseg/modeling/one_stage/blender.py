"""BlendMask's blender (also DR1Mask's): per-instance attention × RoI-pooled bases → mask logits,
and the centerness-weighted mask loss both models train it with."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from dynaseg.layers.roi_align import roi_align_aligned, roi_align_separable

__all__ = ["pool_bases", "blend", "blender_mask_loss"]


def pool_bases(
    bases: Tensor, rois: Tensor, *, resolution: int, sampling_ratio: int, stride: int = 4
) -> Tensor:
    """RoIAlign the bases inside each box.

    bases: (B, K, H/4, W/4); rois: (N, 5) [b, x0, y0, x1, y1] in input pixels → (N, K, R, R).
    Training on a CPU pools with the separable form (same numbers, a backward of matrix products:
    about 3× faster for these few large crops); otherwise torchvision's op (also what export traces).
    """
    train_on_cpu = bases.requires_grad and bases.device.type == "cpu"
    pool = roi_align_separable if train_on_cpu else roi_align_aligned
    return pool(
        bases,
        rois,
        output_size=resolution,
        spatial_scale=1.0 / stride,
        sampling_ratio=sampling_ratio,
    )


def blend(pooled_bases: Tensor, attention: Tensor) -> Tensor:
    """BlendMask's blender.

    The M×M attention logits are upsampled bilinearly to R×R, normalised with a softmax over the
    K bases, multiplied with the pooled bases and summed over K:
    ``m = Σ_k softmax_k(up(a))_k ∘ r_k``.

    pooled_bases: (N, K, R, R); attention: (N, K, M, M) → mask logits (N, R, R).
    """
    r = pooled_bases.shape[-1]
    weights = F.interpolate(attention, size=(r, r), mode="bilinear", align_corners=False).softmax(
        dim=1
    )
    return (weights * pooled_bases).sum(dim=1)


def blender_mask_loss(
    mask_logits: Tensor, mask_targets: Tensor, weights: Tensor, normalizer: Tensor
) -> Tensor:
    """Per-positive mean BCE, weighted by the centerness target, summed, divided by ``normalizer``.

    mask_logits, mask_targets: (P, R, R); weights: (P,); normalizer: scalar (Σ centerness over ranks).
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    per_instance = F.binary_cross_entropy_with_logits(
        mask_logits.float(), mask_targets, reduction="none"
    ).mean(dim=(1, 2))
    return (per_instance * weights).sum() / normalizer
