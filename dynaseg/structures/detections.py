"""One image's detections before paste-back: what ``forward`` hands to post-processing and what
the ONNX graph outputs (``dynaseg/export/onnx.py``)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["RawDetections", "PanopticMaps"]


class RawDetections(NamedTuple):
    """Detections in network-input pixels, boxes clipped to the image's valid size, by decreasing score.

    Mask i covers its box exactly (as aligned RoIAlign sampled it) and is
    ``mask_probs[i, :r_i, :r_i]`` with r_i = ``mask_resolutions[i]``; the rest of its row is zero
    (one side R for every detection except under DynaMask's per-instance choice).
    """

    boxes: Tensor  # (N, 4) XYXY
    scores: Tensor  # (N,)
    labels: Tensor  # (N,) int64 contiguous class ids
    mask_probs: Tensor  # (N, R, R) probabilities
    mask_resolutions: Tensor  # (N,) int64


class PanopticMaps(NamedTuple):
    """What panoptic DR1Mask adds for one image: Eq. 9's parts before the instances are grouped."""

    columns: Tensor  # (N, C_F): each detection's dynamic column of the panoptic layer
    features: Tensor  # (C_F, Hp/4, Wp/4): the map F
    stuff_logits: Tensor  # (S, Hp/4, Wp/4): the static stuff rows times F
