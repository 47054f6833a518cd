"""A padded batch of images with their sizes and (optional) targets."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dynaseg.structures.instances import Instances

__all__ = ["Batch"]


@dataclass(kw_only=True)
class Batch:
    """What every meta-architecture's ``forward`` takes.

    Attributes:
        images: (B, 3, Hp, Wp) float32 RGB in [0, 255], zero-padded at bottom/right,
            not normalised (the model normalises, so exported graphs take raw pixels).
        image_sizes: valid (h, w) of each image inside the padding, after resizing.
        original_sizes: (h, w) of each image as read from disk; predictions are returned at this size.
        image_ids: dataset image ids (COCO ``id``), -1 when unknown.
        targets: ground truth at ``image_sizes`` (masks (N, h, w) bool), or None at inference.
        sem_seg: (B, Hp, Wp) int64 semantic targets aligned with ``images`` (panoptic data: contiguous
            stuff id per pixel, ``IGNORE_LABEL`` = 255 on void, crowd, thing and padding pixels), or
            None when the data has no semantic map.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    image_ids: list[int]
    targets: list[Instances] | None = None
    sem_seg: Tensor | None = None

    @classmethod
    def from_images(
        cls,
        images: list[Tensor],
        *,
        size_divisibility: int,
        original_sizes: list[tuple[int, int]] | None = None,
        image_ids: list[int] | None = None,
        targets: list[Instances] | None = None,
    ) -> Batch:
        """Images (3, h_i, w_i) of any dtype, already resized → a ``Batch`` of float32 pixels
        zero-padded at the bottom / right to the largest size rounded up to ``size_divisibility``.
        ``original_sizes`` default to the input sizes, ``image_ids`` to -1."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        d = max(1, size_divisibility)
        hp = -(-max(h for h, _ in sizes) // d) * d
        wp = -(-max(w for _, w in sizes) // d) * d
        padded = images[0].new_zeros((len(images), 3, hp, wp), dtype=torch.float32)
        for k, (im, (h, w)) in enumerate(zip(images, sizes)):
            padded[k, :, :h, :w] = im
        return cls(
            images=padded,
            image_sizes=sizes,
            original_sizes=list(original_sizes) if original_sizes is not None else list(sizes),
            image_ids=list(image_ids) if image_ids is not None else [-1] * len(images),
            targets=targets,
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(
        self,
        device: torch.device | str,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Batch:
        targets = None if self.targets is None else [t.to(device) for t in self.targets]
        images = self.images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        sem_seg = None if self.sem_seg is None else self.sem_seg.to(device, non_blocking=True)
        return replace(self, images=images, targets=targets, sem_seg=sem_seg)
