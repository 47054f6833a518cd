"""Fixed-field per-image instance container (ground truth or predictions)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

__all__ = ["Instances"]


@dataclass(kw_only=True)
class Instances:
    """N objects in one image; every tensor field has length N along dim 0.

    Indexing applies to every field, so ``dets[dets.scores > 0.5]`` keeps the fields aligned.

    Attributes:
        image_size: (height, width) of the image the coordinates refer to.
        boxes: (N, 4) float32, XYXY, absolute pixels.
        labels: (N,) int64, contiguous class ids in [0, num_classes).
        scores: (N,) float32 confidence; predictions only.
        masks: (N, H, W) bool full-image masks at ``image_size``, or None.
    """

    image_size: tuple[int, int]
    boxes: Tensor
    labels: Tensor
    scores: Tensor | None = None
    masks: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.dim() != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4), got {tuple(self.boxes.shape)}")
        for f in ("labels", "scores", "masks"):
            value = getattr(self, f)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"{f} has length {value.shape[0]}, boxes has {n}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def _tensor_fields(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }

    def __getitem__(self, index: int | slice | Tensor) -> Instances:
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return replace(self, **{k: v[index] for k, v in self._tensor_fields().items()})

    def to(self, device: torch.device | str) -> Instances:
        return replace(self, **{k: v.to(device) for k, v in self._tensor_fields().items()})

    @staticmethod
    def empty(
        image_size: tuple[int, int], *, with_scores: bool = False, with_masks: bool = False
    ) -> Instances:
        h, w = image_size
        return Instances(
            image_size=image_size,
            boxes=torch.zeros(0, 4),
            labels=torch.zeros(0, dtype=torch.int64),
            scores=torch.zeros(0) if with_scores else None,
            masks=torch.zeros(0, h, w, dtype=torch.bool) if with_masks else None,
        )

    @staticmethod
    def cat(items: list[Instances]) -> Instances:
        if not items:
            raise ValueError("Instances.cat needs at least one element")
        size = items[0].image_size
        if any(it.image_size != size for it in items):
            raise ValueError("Instances.cat: image sizes differ")
        merged = {}
        for name in items[0]._tensor_fields():
            merged[name] = torch.cat([getattr(it, name) for it in items])
        return replace(items[0], **merged)
