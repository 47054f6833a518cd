"""DynaMask's mask branch for the two-stage detector (the ``MaskBranch`` protocol, rcnn/mask_branch.py).

Training (paper §3.3, §4.1): for ``msm_start_iter`` iterations the MSM is off and every RoI is trained
at all four resolutions; from then on the MSM draws a hard Gumbel-softmax selection per RoI and the
objective is Eq. 7. Inference: a policy (MSM argmax, the size rule of Eq. 8, or a fixed resolution)
picks one resolution per RoI and the head stops there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dynaseg.layers.dynamic_shapes import image_size_tensor
from dynaseg.modeling.dynamask.cost import mask_head_macs, msm_macs
from dynaseg.modeling.dynamask.head import DynaMaskHead
from dynaseg.modeling.dynamask.losses import (
    LaplacianEdges,
    budget_loss,
    entropy_loss,
    predicted_mask_edges,
    selected_edge_loss,
    selected_mask_loss,
)
from dynaseg.modeling.dynamask.mask_switch import (
    MaskSwitchModule,
    gumbel_softmax_select,
    select_resolution,
)
from dynaseg.modeling.dynamask.size_rule import size_based_resolution
from dynaseg.modeling.rcnn.mask_branch import MaskBranchOutput
from dynaseg.structures.masks import roi_mask_targets

__all__ = ["DynaMaskBranch", "quota_resolution"]

Pooler = Callable[[dict[str, Tensor], Tensor], Tensor]
_NORMALIZERS = ("instances", "none")
_BUDGET_UNITS = ("gmac", "fraction")
_BUDGET_ON = ("selection", "probs")


def quota_resolution(rois: Tensor, quota: tuple[float, ...]) -> Tensor:
    """Resolution index per RoI from fixed fractions: in each image, the smallest ⌊q_0·n⌉ boxes get
    index 0, the next ⌊q_1·n⌉ index 1, …, the largest the last. rois: (N, 5) → (N,) int64."""
    choice = torch.empty(rois.shape[0], dtype=torch.long, device=rois.device)
    bounds = torch.tensor(quota, dtype=torch.float64).cumsum(0)
    for b in rois[:, 0].unique():
        index = (rois[:, 0] == b).nonzero().squeeze(1)
        area = (rois[index, 3] - rois[index, 1]) * (rois[index, 4] - rois[index, 2])
        ranked = index[area.argsort(stable=True)]
        edges = (bounds * len(ranked)).round().long().tolist()
        start = 0
        for k, end in enumerate(edges):
            choice[ranked[start:end]] = k
            start = end
        choice[ranked[start:]] = len(quota) - 1
    return choice


def _detector_pool(features: dict[str, Tensor], rois: Tensor, output_size: int) -> Tensor:
    """The detector's multi-level RoIAlign (FPN level rule on p2..p5), imported when first used."""
    from dynaseg.modeling.rcnn.pooler import multilevel_roi_align

    return multilevel_roi_align(features, rois, output_size=output_size, sampling_ratio=0)


class DynaMaskBranch(nn.Module):
    """Mask branch = 14×14 RoI pooler + r-FPN head (``DynaMaskHead``) + Mask Switch Module.

    Losses, as separate weighted terms whose sum is Eq. 7
    (L_mask + λ1 L_edge + λ2 (L_budget + L_entropy)):
    ``loss_mask`` (Eq. 3), ``loss_edge`` = λ1·Eq. 4, ``loss_budget`` = λ2·Eq. 5, ``loss_entropy`` = λ2·Eq. 6.

    * Phase 1 (the first ``msm_start_iter`` calls of ``losses``; §4.1 "We first pre-train the model
      without MSM using mask loss at all resolutions for one epoch"): y_i^k = 1 for every RoI and
      resolution, so Eq. 3/4 train all four predictions; the MSM is not run (no gradient, and the
      budget/entropy terms are 0). Under DDP this phase needs ``find_unused_parameters=True``.
    * Phase 2: MSM logits on the 14×14 RoI features, y = hard straight-through Gumbel-softmax sample
      (Eq. 2, τ = ``gumbel_tau``), Eq. 3/4 weighted by y, Eq. 5 on the cost of the selected
      resolutions (y, straight-through) with the head's measured per-resolution GMAC, Eq. 6 on p.
    * Edges ê of Eq. 4 (``edge_source``): "mask" takes them from each resolution's predicted mask
      with the ground-truth operator (``predicted_mask_edges``, Fig. 5), so the edge loss measures
      the quality of the mask the MSM picks; "head" uses the head's separate edge logits.

    The phase is read from the persistent buffer ``num_updates`` (calls of ``losses`` so far), so it
    survives checkpoint/resume. Every branch parameter gets a gradient in phase 2.

    In phase 2 ``losses`` also returns, detached and not part of the objective (their keys do not
    start with "loss"), what the MSM does to the batch: ``msm/pick_{side}``, the fraction of RoIs
    whose Gumbel sample selected each side, ``msm/prob_{side}``, the mean of p (Eq. 1),
    ``msm/argmax_{side}``, the fraction whose most probable side it is (what inference picks), and
    ``msm/confidence``, the mean of max_k p (how decided the MSM is: 1/K when p is uniform).

    Args:
        head: the r-FPN head. msm: the MSM, on the same C×14×14 RoI features.
        num_classes: C, must equal the head's.
        pooler: ``(features, rois) -> (N, C, 14, 14)`` RoI features; None uses the detector's
            ``rcnn.pooler.multilevel_roi_align`` (FPN level rule on p2..p5, sampling ratio 0).
        gumbel_tau: Eq. 2's τ. The paper gives no value; 0.5 is the official code's.
        budget_target: C_t of Eq. 5 in ``budget_unit``.
        budget_unit: "gmac": C_t in GMAC per instance, the unit of ``gmac_per_resolution`` (the paper's
            G: Table 5's C_t = 1.0 … 0.4 against 1.40 for the 112 path, typed as printed for a head
            built like the paper's); "fraction": C_t as a fraction of this head's own 112 cost (heads
            of other widths; the paper-equivalent fraction is C_t / 1.40).
        budget_on: E(C) over the selection y ("selection", the paper) or over the softmax p ("probs").
        edge_source: where ê of Eq. 4 comes from, "mask" (the paper) or "head" (needs ``head.edge_predictors``).
        lambda_edge: λ1 (0.1, §4.1). lambda_reg: λ2 (0.4 in Table 5's −19 % and −54 % models).
        msm_start_iter: iterations of phase 1 (one epoch in the paper; 0 = MSM from the start).
        policy: inference resolution policy, a plain attribute that may be changed at any time:
            "msm" (argmax of the MSM logits, no noise), "size" (Eq. 8 with √(w0·h0) from
            ``size_reference``), "quota" (``quota_resolution``: fixed fractions, smallest boxes first,
            after running the MSM, to time a known mix), or a fixed side "14" / "28" / "56" / "112".
        quota: the "quota" policy's fractions of detections per resolution (K values summing to 1).
        size_reference: √(w0·h0) of Eq. 8: "image" (each RoI's input image, the paper's words) or a
            fixed side in pixels (224: FPN's canonical size).
        mask_normalizer: "instances" divides the Eq. 3/4 sums over RoIs by P (MMDetection's
            per-instance mean, which §4.1's "loss functions are set the same as Mask R-CNN" implies);
            "none" keeps the sums as printed.
        detach_msm_input: feed the MSM a detached copy of the RoI features. The paper is silent; the
            official code detaches its MSM input. Detaching keeps the budget/entropy terms and the
            selection gradient (which are about compute, not segmentation) out of the shared FPN.
        edge_threshold: threshold of the Laplacian GT edges.
    """

    resolution_macs: Tensor
    num_updates: Tensor

    def __init__(
        self,
        *,
        head: DynaMaskHead,
        msm: MaskSwitchModule,
        num_classes: int,
        pooler: Pooler | None = None,
        gumbel_tau: float = 0.5,
        budget_target: float = 1.0,
        budget_unit: str = "gmac",
        budget_on: str = "selection",
        edge_source: str = "mask",
        lambda_edge: float = 0.1,
        lambda_reg: float = 0.4,
        msm_start_iter: int = 0,
        policy: str = "msm",
        mask_normalizer: str = "instances",
        detach_msm_input: bool = True,
        edge_threshold: float = 0.1,
        quota: tuple[float, ...] = (0.35, 0.34, 0.21, 0.10),
        size_reference: str | float = "image",
    ) -> None:
        super().__init__()
        if num_classes != head.num_classes:
            raise ValueError(f"num_classes={num_classes} but the head has {head.num_classes}")
        if mask_normalizer not in _NORMALIZERS:
            raise ValueError(
                f"mask_normalizer must be one of {_NORMALIZERS}, got '{mask_normalizer}'"
            )
        if budget_unit not in _BUDGET_UNITS or budget_on not in _BUDGET_ON:
            raise ValueError(
                f"budget_unit must be one of {_BUDGET_UNITS} and budget_on one of {_BUDGET_ON}, "
                f"got '{budget_unit}', '{budget_on}'"
            )
        if budget_target <= 0:
            raise ValueError(f"budget_target must be > 0, got {budget_target}")
        if edge_source not in ("mask", "head") or (edge_source == "head") != (
            head.edge_predictors is not None
        ):
            raise ValueError(
                f"edge_source='{edge_source}' needs a head with edge predictors exactly when it is 'head'"
            )
        if size_reference != "image" and not (
            isinstance(size_reference, (int, float)) and size_reference > 0
        ):
            raise ValueError(
                f"size_reference must be 'image' or a side > 0, got {size_reference!r}"
            )
        self.head, self.msm, self.num_classes = head, msm, num_classes
        self.pooler = pooler
        self.edges = LaplacianEdges(threshold=edge_threshold)
        # Loss parameters
        self.gumbel_tau, self.budget_target = gumbel_tau, budget_target
        self.budget_unit, self.budget_on, self.edge_source = budget_unit, budget_on, edge_source
        self.lambda_edge, self.lambda_reg = lambda_edge, lambda_reg
        self.msm_start_iter, self.mask_normalizer = msm_start_iter, mask_normalizer
        self.detach_msm_input = detach_msm_input
        # Inference parameters
        if len(quota) != head.num_resolutions or min(quota) < 0 or abs(sum(quota) - 1) > 1e-6:
            raise ValueError(
                f"quota needs {head.num_resolutions} non-negative fractions summing to 1, got {quota}"
            )
        self._check_policy(policy)
        self.policy, self.quota, self.size_reference = policy, tuple(quota), size_reference
        # Per-instance cost of exiting at 14/28/56/112 (GMAC), measured on this head; Eq. 5's C.
        macs = mask_head_macs(head, channels=head.in_channels, num_classes=num_classes)
        self.register_buffer(
            "resolution_macs", torch.tensor([macs[s] for s in head.sides]), persistent=False
        )
        self.msm_gmacs = msm_macs(msm, channels=head.in_channels, input_size=head.sides[0])
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def gmac_per_resolution(self) -> dict[int, float]:
        """Mask-head GMAC per instance exiting at each side (the MSM's cost not included)."""
        return {side: float(c) for side, c in zip(self.head.sides, self.resolution_macs.tolist())}

    def budget_costs(self) -> Tensor:
        """C^k of Eq. 5 in the unit of ``budget_target``: (K,) GMAC, or fractions of the 112 cost."""
        if self.budget_unit == "fraction":
            return self.resolution_macs / self.resolution_macs[-1]
        return self.resolution_macs

    def overhead_gmac(self) -> float:
        """GMAC every instance pays whatever its resolution: the MSM."""
        return self.msm_gmacs

    # ------------------------------------------------------------------ shared

    def _check_policy(self, policy: str) -> None:
        allowed = ("msm", "size", "quota", *(str(s) for s in self.head.sides))
        if policy not in allowed:
            raise ValueError(f"policy must be one of {allowed}, got '{policy}'")

    def roi_features(self, features: dict[str, Tensor], rois: Tensor) -> Tensor:
        """features: FPN maps; rois: (N, 5) → (N, C, 14, 14) RoI features (pooler output)."""
        if self.pooler is None:
            return _detector_pool(features, rois, self.head.sides[0])
        return self.pooler(features, rois)

    @property
    def msm_active(self) -> bool:
        """Whether the next ``losses`` call is in phase 2 (MSM on)."""
        return int(self.num_updates) >= self.msm_start_iter

    # ------------------------------------------------------------------ training

    def losses(
        self,
        *,
        features: dict[str, Tensor],
        rois: Tensor,
        labels: Tensor,
        gt_masks: list[Tensor],
        gt_index: Tensor,
    ) -> dict[str, Tensor]:
        """Weighted loss terms for P positive RoIs (see the class docstring); one call = one iteration.

        features: {"p2": (B, C, Hp/4, Wp/4), ...}; rois: (P, 5) input pixels; labels: (P,) GT classes;
        gt_masks: per image (M_i, h, w) bool; gt_index: (P,) → {"loss_mask", "loss_edge",
        "loss_budget", "loss_entropy"}: scalars, and in phase 2 the ``msm/*`` statistics. P = 0 gives
        zeros connected to every parameter.
        """
        msm_on = self.msm_active
        with torch.no_grad():
            self.num_updates += 1
        num_rois = rois.shape[0]
        if num_rois == 0:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            empty = zero.new_zeros((0, self.head.num_resolutions))
            return {
                "loss_mask": zero,
                "loss_edge": zero.clone(),
                "loss_budget": zero.clone(),
                "loss_entropy": zero.clone(),
                **(self._msm_statistics(empty, empty) if msm_on else {}),
            }

        roi_feats = self.roi_features(features, rois)
        mask_logits, edge_logits = self.head.forward_all(roi_feats, features, rois, labels)
        if self.edge_source == "mask":
            edge_preds = [predicted_mask_edges(m) for m in mask_logits]
        else:
            edge_preds = edge_logits
        mask_targets = [
            roi_mask_targets(gt_masks, rois, gt_index, side) for side in self.head.sides
        ]
        edge_targets = [self.edges(target) for target in mask_targets]
        normalizer = float(num_rois) if self.mask_normalizer == "instances" else 1.0

        if msm_on:
            msm_logits = self.msm(
                roi_feats.detach() if self.detach_msm_input else roi_feats
            )  # (P, K)
            selection = gumbel_softmax_select(msm_logits, tau=self.gumbel_tau, hard=True)
            probs = msm_logits.float().softmax(dim=1)
            weights = selection if self.budget_on == "selection" else probs
            l_budget = budget_loss(weights, self.budget_costs(), self.budget_target)
            l_entropy = entropy_loss(probs)
        else:
            selection = roi_feats.new_ones((num_rois, self.head.num_resolutions))
            l_budget = l_entropy = roi_feats.new_zeros((), dtype=torch.float32)
        l_mask = selected_mask_loss(mask_logits, mask_targets, selection, normalizer=normalizer)
        l_edge = selected_edge_loss(
            edge_preds,
            edge_targets,
            selection,
            normalizer=normalizer,
            from_logits=self.edge_source == "head",
        )
        return {
            "loss_mask": l_mask,
            "loss_edge": self.lambda_edge * l_edge,
            "loss_budget": self.lambda_reg * l_budget,
            "loss_entropy": self.lambda_reg * l_entropy,
            **(self._msm_statistics(selection, probs) if msm_on else {}),
        }

    def _msm_statistics(self, selection: Tensor, probs: Tensor) -> dict[str, Tensor]:
        """selection, probs: (P, K) → ``msm/pick_{side}``, ``msm/prob_{side}``, ``msm/argmax_{side}``
        and ``msm/confidence``: detached batch means (zeros when P = 0, so that every rank logs the
        same keys)."""
        probs = probs.detach().float()
        num = max(selection.shape[0], 1)
        picked = selection.detach().float().sum(dim=0) / num
        mean_p = probs.sum(dim=0) / num
        top_p, top = probs.max(dim=1)
        argmax = torch.bincount(top, minlength=probs.shape[1]).float() / num
        stats = {"msm/confidence": top_p.sum() / num}
        for k, side in enumerate(self.head.sides):
            stats[f"msm/pick_{side}"] = picked[k]
            stats[f"msm/prob_{side}"] = mean_p[k]
            stats[f"msm/argmax_{side}"] = argmax[k]
        return stats

    # ------------------------------------------------------------------ inference

    def select(
        self, roi_feats: Tensor, rois: Tensor, image_sizes: Tensor | list[tuple[int, int]]
    ) -> Tensor:
        """Resolution index per RoI under ``self.policy``: (N, C, 14, 14), (N, 5) → (N,) int64 in 0..K-1."""
        self._check_policy(self.policy)
        if self.policy == "msm":
            return select_resolution(self.msm(roi_feats))
        if self.policy == "quota":
            self.msm(roi_feats)  # its cost is paid; its choice is replaced
            return quota_resolution(rois, self.quota)
        if self.policy == "size":
            sizes = image_size_tensor(image_sizes, rois.device).to(torch.float64)
            return self.size_rule(rois, (sizes[:, 0] * sizes[:, 1]).sqrt())
        index = self.head.sides.index(int(self.policy))
        return torch.full((rois.shape[0],), index, dtype=torch.long, device=rois.device)

    def size_rule(self, rois: Tensor, image_sides: Tensor) -> Tensor:
        """Eq. 8 for each RoI with √(w0·h0) from ``size_reference``: rois (N, 5); image_sides (B,)
        √(h·w) of each input image (used when the reference is "image") → (N,) int64 in 0..K-1."""
        if self.size_reference == "image":
            canonical = image_sides.to(torch.float64).index_select(0, rois[:, 0].long())
        else:
            canonical = float(self.size_reference)
        return size_based_resolution(
            rois[:, 1:], canonical_size=canonical, num_choices=self.head.num_resolutions
        )

    def predict(
        self,
        *,
        features: dict[str, Tensor],
        rois: Tensor,
        labels: Tensor,
        image_sizes: Tensor | list[tuple[int, int]],
    ) -> MaskBranchOutput:
        """Masks for N detections (rois (N, 5), labels (N,) predicted classes, image_sizes (h, w) per
        image) → ``MaskBranchOutput``: (N, R, R) probabilities, mask i at the top left of its row,
        and r_i (N,) int64 in 14/28/56/112; R = 112 (``msm``, ``size``, ``quota``) or the fixed
        policy's side (the stages above it never run). Traceable for ``msm``, ``size`` and fixed.
        """
        self._check_policy(self.policy)
        fixed = self.policy not in ("msm", "size", "quota")
        last = self.head.sides.index(int(self.policy)) if fixed else self.head.num_resolutions - 1
        n = rois.shape[0]
        tracing = torch.jit.is_tracing()
        if tracing:  # onnxruntime's MatMul fails on an empty batch (the FAM's deformable convs):
            # one dummy RoI goes through every stage and is dropped.
            rois = torch.cat([rois, rois.new_tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])])
            labels = torch.cat([labels, labels.new_zeros(1)])
        roi_feats = self.roi_features(features, rois)
        choice = self.select(roi_feats, rois, image_sizes)
        if tracing:
            choice = torch.cat([choice[:n], choice.new_full((1,), last)])
        logits = self.head.forward_early_exit(roi_feats, features, rois, labels, choice, last)
        sides = torch.tensor(self.head.sides, dtype=torch.long, device=rois.device)
        return MaskBranchOutput(logits[:n].sigmoid(), sides.index_select(0, choice[:n]))
