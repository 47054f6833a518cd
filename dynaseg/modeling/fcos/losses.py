"""FCOS losses: focal classification, centerness-weighted GIoU, centerness BCE."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dynaseg.utils.comm import reduce_mean

__all__ = ["fcos_losses", "fcos_normalizers", "object_balanced_weights"]


def fcos_normalizers(num_pos: Tensor, ctr_targets: Tensor) -> tuple[Tensor, Tensor]:
    """max(mean_over_ranks(#positives), 1) and max(mean_over_ranks(Σ ctr targets), 1e-6)."""
    num_pos_avg = reduce_mean(num_pos.float()).clamp(min=1.0)
    ctr_sum_avg = reduce_mean(ctr_targets.sum().detach()).clamp(min=1e-6)
    return num_pos_avg, ctr_sum_avg


def object_balanced_weights(gt_index: Tensor) -> Tensor:
    """Weights of P positives such that each object's positives sum to the mean number of positives
    per object: w_i = (P / #objects) / #positives of object gt_index[i]. Σ w = P, so the loss keeps
    its normaliser. gt_index: (P,) object of each positive (any ids) → (P,) float32."""
    if gt_index.numel() == 0:
        return gt_index.new_zeros(0, dtype=torch.float32)
    objects, inverse, counts = torch.unique(gt_index, return_inverse=True, return_counts=True)
    per_object = gt_index.numel() / objects.numel()
    return per_object / counts[inverse].float()


def fcos_losses(
    *,
    cls_logits: Tensor,
    box_ltrb: Tensor,
    centerness: Tensor,
    labels: Tensor,
    box_targets: Tensor,
    ctr_targets: Tensor,
    num_pos_avg: Tensor,
    ctr_sum_avg: Tensor,
    focal_alpha: float,
    focal_gamma: float,
    positive_weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """Loss terms over R locations of the whole batch (P of them positive).

    Args:
        cls_logits: (R, C). labels: (R,) with C = background.
        positive_weights: (P,) classification-loss weights of the positives, in the order of
            ``labels``' positive rows (negatives weigh 1); None: all 1 (FCOS).
        box_ltrb: (P, 4) predictions at the positives, stride units. box_targets: (P, 4).
        centerness: (P,) logits at the positives. ctr_targets: (P,) in [0, 1].
    """
    num_classes = cls_logits.shape[1]
    onehot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(cls_logits.dtype)
    focal = sigmoid_focal_loss(
        cls_logits, onehot, alpha=focal_alpha, gamma=focal_gamma, reduction="none"
    )  # (R, C)
    if positive_weights is not None:
        weights = torch.ones_like(focal[:, 0])
        weights[labels != num_classes] = positive_weights.to(focal.dtype)
        focal = focal * weights[:, None]
    loss_cls = focal.sum() / num_pos_avg
    # Both boxes share the anchor point, so (-l, -t, r, b) is an exact box parametrisation.
    sign = box_ltrb.new_tensor([-1.0, -1.0, 1.0, 1.0])
    giou = generalized_box_iou_loss(
        box_ltrb.float() * sign, box_targets.float() * sign, reduction="none"
    )
    loss_loc = (giou * ctr_targets).sum() / ctr_sum_avg
    loss_ctr = (
        F.binary_cross_entropy_with_logits(centerness.float(), ctr_targets, reduction="sum")
        / num_pos_avg
    )
    return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}
