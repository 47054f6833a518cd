"""Mask-head benchmarks: per-instance MACs at each resolution, and wall time per instance by policy."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from dynaseg.modeling.dynamask.branch import DynaMaskBranch

__all__ = [
    "PAPER_TABLE7_GFLOPS",
    "PAPER_MASK_RCNN_GFLOPS",
    "mask_head_flops",
    "time_mask_head",
    "random_rois",
]

# For display beside our measured numbers only (DynaMask paper, Table 7); never used as costs.
PAPER_TABLE7_GFLOPS = {14: 0.23, 28: 0.62, 56: 1.01, 112: 1.40}
PAPER_MASK_RCNN_GFLOPS = 0.5


def mask_head_flops(
    model: nn.Module, reference_mask_rcnn: nn.Module | None = None
) -> dict[str, Any]:
    """Measured per-instance GMACs of a two-stage model's mask branch (and of a 28×28 Mask R-CNN head)."""
    branch = model.mask_branch
    out: dict[str, Any] = {
        "mask_head_gmac_per_instance": {str(s): g for s, g in branch.gmac_per_resolution().items()},
        "per_instance_overhead_gmac": branch.overhead_gmac(),
        "paper_table7_gflops": {str(s): g for s, g in PAPER_TABLE7_GFLOPS.items()},
        "paper_mask_rcnn_gflops": PAPER_MASK_RCNN_GFLOPS,
    }
    if reference_mask_rcnn is not None:
        out["mask_rcnn_28_gmac_per_instance"] = (
            reference_mask_rcnn.mask_branch.gmac_per_resolution()[28]
        )
    return out


def random_rois(num: int, image_size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``num`` boxes in one image, side log-uniform from 16 px to the image's short side → (num, 5)."""
    h, w = image_size
    side = 16.0 * (min(h, w) / 16.0) ** torch.rand(num, 2, generator=generator)
    x0 = torch.rand(num, generator=generator) * (w - side[:, 0])
    y0 = torch.rand(num, generator=generator) * (h - side[:, 1])
    return torch.stack([torch.zeros(num), x0, y0, x0 + side[:, 0], y0 + side[:, 1]], dim=1)


def _forced_mix(num: int, mix: list[float]) -> Tensor:
    counts = [round(f * num) for f in mix]
    counts[-1] = num - sum(counts[:-1])
    return torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])


@torch.inference_mode()
def time_mask_head(
    model: nn.Module,
    *,
    policy: str,
    num_instances: int,
    image_size: tuple[int, int],
    mix: list[float] | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Median wall time of the mask branch alone on fixed random FPN features and RoIs.

    ``policy`` is 14/28/56/112/msm/size for DynaMask (ignored for Mask R-CNN); with ``mix`` the MSM
    still runs but its choices are replaced by the given fractions (14, 28, 56, 112).
    """
    model.eval()
    branch = model.mask_branch
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    channels = model.backbone.out_channels
    features = {
        f"p{lv}": torch.randn(1, channels, -(-h // 2**lv), -(-w // 2**lv), generator=g)
        for lv in range(2, 7)
    }
    rois = random_rois(num_instances, image_size, g)
    labels = torch.randint(model.num_classes, (num_instances,), generator=g)
    dyna = isinstance(branch, DynaMaskBranch)
    if dyna:
        branch.policy = "msm" if mix else policy

    def run() -> Tensor:
        if dyna and mix:
            roi_feats = branch.roi_features(features, rois)
            branch.msm(roi_feats)
            choice = _forced_mix(num_instances, mix)
            branch.head.forward_early_exit(roi_feats, features, rois, labels, choice)
            return torch.tensor([branch.head.sides[k] for k in choice.tolist()])
        return branch.predict(
            features=features, rois=rois, labels=labels, image_sizes=[image_size]
        ).resolutions

    run()  # warm-up
    times, sides = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        sides = run()
        times.append(time.perf_counter() - start)
    costs = model.mask_gmac_per_resolution()
    gmac = sum(costs[int(s)] for s in sides.tolist()) / num_instances
    ms = statistics.median(times) * 1000 / num_instances
    return {
        "ms_per_instance": ms,
        "gmac_per_instance": gmac,
        "policy": "mix" if mix else policy,
        "num_instances": num_instances,
        "resolution_counts": {str(s): int((sides == s).sum()) for s in sorted(costs)},
    }
