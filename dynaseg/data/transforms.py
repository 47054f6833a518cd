"""Train / test transforms on ``torchvision.transforms.v2``.

A sample is a dict::

    {"image": tv_tensors.Image (3, H, W) uint8,
     "boxes": tv_tensors.BoundingBoxes (N, 4) XYXY float32, canvas_size=(H, W),
     "masks": tv_tensors.Mask (N, H, W) bool,
     "labels": Tensor (N,) int64,
     "iscrowd": Tensor (N,) bool (optional),
     "sem_seg": tv_tensors.Mask (H, W) uint8 (optional, panoptic data: one label per pixel)}

v2 moves image, boxes and masks together (masks with nearest-neighbour sampling) and passes the
plain ``labels`` / ``iscrowd`` tensors through; :class:`SanitizeInstances` keeps them aligned when
boxes are removed. ``sem_seg`` is a per-pixel map, not a per-instance field (``DENSE_KEYS``): it is
resized (nearest) and flipped with the image but never filtered with the boxes. All randomness comes
from torch's global RNG, which the dataset seeds per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "ResizeShortestEdge",
    "SanitizeInstances",
    "build_train_transforms",
    "build_test_transforms",
    "resized_shape",
    "ALIGNED_KEYS",
    "DENSE_KEYS",
]

ALIGNED_KEYS = ("labels", "iscrowd")  # per-instance plain tensors kept aligned with the boxes
DENSE_KEYS = (
    "sem_seg",
)  # per-pixel tv_tensors.Mask maps: transformed with the image, never sanitised


def resized_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) when scaling the short side to ``short`` with the long side capped at
    ``max_size`` (detectron2 ``ResizeShortestEdge`` semantics: one scale for both sides, rounded).
    ``max_size <= 0`` disables the cap."""
    scale = short / min(height, width)
    if max_size > 0 and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


class ResizeShortestEdge(v2.Transform):
    """Resize so the short side equals a length drawn uniformly from ``short_edge_lengths``.

    With one length this is deterministic (the test transform). Unlike ``v2.RandomShortestSize``
    (which truncates) and ``v2.Resize(max_size=...)`` (which truncates and computes the capped short
    side separately), sizes are rounded from a single scale factor, like detectron2. Masks use
    ``nearest-exact`` sampling (pixel centres), images ``interpolation`` with antialiasing (a 1x1
    uint8 output is computed in float: torch's uint8 antialiasing kernel asserts on it).
    """

    def __init__(
        self,
        short_edge_lengths: int | Sequence[int],
        max_size: int,
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
        antialias: bool = True,
    ) -> None:
        super().__init__()
        lengths = (
            [short_edge_lengths]
            if isinstance(short_edge_lengths, int)
            else list(short_edge_lengths)
        )
        if not lengths or min(lengths) <= 0:
            raise ValueError(f"short_edge_lengths must be positive, got {short_edge_lengths!r}")
        self.short_edge_lengths = lengths
        self.max_size = max_size
        self.interpolation = interpolation
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _query_size(flat_inputs)
        k = (
            int(torch.randint(len(self.short_edge_lengths), ()))
            if len(self.short_edge_lengths) > 1
            else 0
        )
        return {
            "size": list(resized_shape(height, width, self.short_edge_lengths[k], self.max_size))
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        if (
            isinstance(inpt, tv_tensors.Image)
            and inpt.dtype == torch.uint8
            and self.antialias
            and list(params["size"]) == [1, 1]
            and inpt.shape[-2] > 1
        ):
            # torch's uint8 antialiased kernel fails an internal assert for a 1x1 output: go via float.
            out = F.resize(
                inpt.as_subclass(Tensor).float(),
                [1, 1],
                interpolation=self.interpolation,
                antialias=True,
            )
            return tv_tensors.wrap(out.round_().clamp_(0, 255).to(torch.uint8), like=inpt)
        return F.resize(
            inpt, params["size"], interpolation=self.interpolation, antialias=self.antialias
        )


def _query_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for x in flat_inputs:
        if isinstance(x, (tv_tensors.Image, tv_tensors.Mask)):
            return tuple(F.get_size(x))  # type: ignore[return-value]
    for x in flat_inputs:
        if isinstance(x, tv_tensors.BoundingBoxes):
            return tuple(x.canvas_size)  # type: ignore[return-value]
    raise TypeError(
        "ResizeShortestEdge needs a tv_tensors.Image, Mask or BoundingBoxes in the sample"
    )


def _aligned_tensors(sample: Any) -> tuple[Tensor, ...]:
    """labels_getter for SanitizeBoundingBoxes: every per-instance plain tensor in the dict."""
    if not isinstance(sample, dict):
        return ()
    return tuple(sample[k] for k in ALIGNED_KEYS if k in sample)


class SanitizeInstances(v2.SanitizeBoundingBoxes):
    """``SanitizeBoundingBoxes`` that leaves the dense maps of ``DENSE_KEYS`` untouched.

    The parent indexes every ``tv_tensors.Mask`` with the (N,) keep-mask of the boxes, which is right
    for (N, H, W) instance masks and wrong for an (H, W) semantic map, so those are set aside.
    """

    def forward(self, *inputs: Any) -> Any:
        sample = inputs[0] if len(inputs) == 1 else None
        if not isinstance(sample, dict) or not any(k in sample for k in DENSE_KEYS):
            return super().forward(*inputs)
        out = super().forward({k: v for k, v in sample.items() if k not in DENSE_KEYS})
        return {k: sample[k] if k in DENSE_KEYS else out[k] for k in sample}


def build_train_transforms(
    min_sizes: Sequence[int], max_size: int, hflip_prob: float
) -> v2.Compose:
    """Random short side in ``min_sizes`` (long side <= ``max_size``), horizontal flip with
    ``hflip_prob``, then drop boxes narrower/shorter than 1 px (or under 1 px^2) with their masks,
    labels and crowd flags (a ``sem_seg`` map is resized and flipped, not filtered)."""
    ops: list[v2.Transform] = [ResizeShortestEdge(tuple(min_sizes), max_size)]
    if hflip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip_prob))
    ops += [v2.ClampBoundingBoxes(), SanitizeInstances(min_size=1, labels_getter=_aligned_tensors)]
    return v2.Compose(ops)


def build_test_transforms(min_size: int, max_size: int) -> v2.Compose:
    """Deterministic resize: short side ``min_size``, long side <= ``max_size``."""
    return v2.Compose([ResizeShortestEdge(min_size, max_size)])
