"""The contract between a two-stage detector and its mask branch (Mask R-CNN's FCN head, DynaMask).

The detector owns proposals, sampling and boxes; the mask branch owns everything about masks:
its RoI features, its targets, its losses and its per-instance resolution choice.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from torch import Tensor

__all__ = ["MaskBranchOutput", "MaskBranch"]


class MaskBranchOutput(NamedTuple):
    """Mask predictions for N detections, box-relative.

    A mask of side r covers its detection box exactly (as RoIAlign with ``aligned=True`` sampled it).
    Mask i is ``mask_probs[i, :r_i, :r_i]``; the rest of its (R, R) row is zero.
    """

    mask_probs: Tensor  # (N, R, R) probabilities in [0, 1]; R = the largest side the branch makes
    resolutions: Tensor  # (N,) int64: r_i (e.g. 28 for Mask R-CNN; 14/28/56/112 for DynaMask)


class MaskBranch(Protocol):
    """What ``TwoStageDetector`` calls. Implementations are ``nn.Module``s."""

    def losses(
        self,
        *,
        features: dict[str, Tensor],
        rois: Tensor,
        labels: Tensor,
        gt_masks: list[Tensor],
        gt_index: Tensor,
    ) -> dict[str, Tensor]:
        """Weighted ``loss_*`` terms for P positive RoIs; entries whose keys do not start with "loss"
        are detached statistics the trainer logs and does not add to the objective.

        Args:
            features: FPN maps {"p2": (B, C, H/4, W/4), ..., "p5": (B, C, H/32, W/32)} (p6 may be present).
            rois: (P, 5) [image index, x0, y0, x1, y1] positive proposals, input pixels.
            labels: (P,) contiguous class ids of the matched ground truth.
            gt_masks: per image (M_i, h_i, w_i) bool ground-truth masks at the input size.
            gt_index: (P,) index of each RoI's matched ground truth within its image's ``gt_masks``.
        """
        ...

    def predict(
        self,
        *,
        features: dict[str, Tensor],
        rois: Tensor,
        labels: Tensor,
        image_sizes: Tensor | list[tuple[int, int]],
    ) -> MaskBranchOutput:
        """Masks for N detections (rois (N, 5), labels (N,) predicted classes), in RoI order."""
        ...
