"""Map-style panoptic dataset: thing instances and a stuff semantic map from COCO panoptic PNGs.

Each item reads the image and its panoptic PNG, decodes the segment ids and builds

* ``target``: one instance per non-crowd *thing* segment (mask = the segment's pixels, box = the
  tight box of the mask, label = contiguous thing id), capped to the largest ``max_instances`` in
  training;
* ``sem_seg``: (h, w) int64, the contiguous stuff id on non-crowd *stuff* pixels and
  ``IGNORE_LABEL`` (255) on void, crowd and thing pixels (thing targets come from the instances).

The transforms (``dynaseg.data.transforms``) move ``sem_seg`` with the image as a
``tv_tensors.Mask`` (nearest resize, flips) and never filter it with the boxes. Augmentation seeding
and epoch-encoded indices are those of :class:`~dynaseg.data.dataset.InstanceDataset`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchvision import tv_tensors

from dynaseg.data.coco import DatasetError
from dynaseg.data.coco_panoptic import CocoPanoptic, PanopticImageRecord
from dynaseg.data.dataset import InstanceDataset, Transform
from dynaseg.data.image_io import read_image
from dynaseg.structures.panoptic import IGNORE_LABEL, rgb_to_id

__all__ = ["PanopticDataset"]

_MAX_LISTED = 5  # segment ids named in an error message


class PanopticDataset(InstanceDataset):
    """Reads, decodes and transforms one image and its panoptic PNG per item.

    Args:
        panoptic: validated dataset (``load_coco_panoptic``).
        transforms: v2 transform on the sample dict (see ``dynaseg.data.transforms``); None = identity.
        train: apply ``max_instances``.
        max_instances: keep at most this many thing instances (largest masks) per training image;
            0 = all. Dropped things stay ``IGNORE_LABEL`` in ``sem_seg``.
        seed: base seed of the per-sample augmentation RNG.
        on_error: "stop" or "skip", as for :class:`~dynaseg.data.dataset.InstanceDataset`; "skip"
            covers both kinds of errors below (the blank stand-in of an evaluation image is all
            ``IGNORE_LABEL``).
        image_cache_bytes: decoded images kept in memory, as for
            :class:`~dynaseg.data.dataset.InstanceDataset` (the panoptic PNGs are read each time).

    Items are :class:`~dynaseg.data.dataset.Sample` with ``sem_seg`` set. Image and PNG read errors
    raise :class:`~dynaseg.data.image_io.ImageReadError`; a PNG whose size differs from its
    image's, or whose segment ids disagree with the JSON's ``segments_info``, raises
    :class:`~dynaseg.data.coco.DatasetError` naming the PNG.
    """

    def __init__(
        self,
        panoptic: CocoPanoptic,
        transforms: Transform | None,
        *,
        train: bool,
        max_instances: int = 0,
        seed: int = 0,
        on_error: Literal["stop", "skip"] = "stop",
        image_cache_bytes: int = 0,
    ) -> None:
        super().__init__(
            panoptic,
            transforms,
            train=train,
            max_instances=max_instances,  # type: ignore[arg-type]
            seed=seed,
            on_error=on_error,
            image_cache_bytes=image_cache_bytes,
        )
        self.records: list[PanopticImageRecord] = panoptic.records  # type: ignore[assignment]
        self.stuff_names = panoptic.stuff_names

    def _raw_sample(self, rec: PanopticImageRecord, image: Tensor) -> dict[str, Any]:  # type: ignore[override]
        masks, labels, sem_seg = self._targets(rec, _read_ids(rec))
        return {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(
                _mask_boxes(masks), format="XYXY", canvas_size=(rec.height, rec.width)
            ),
            "masks": tv_tensors.Mask(masks),
            "labels": labels,
            "sem_seg": tv_tensors.Mask(sem_seg),
        }

    def _blank_sample(self, rec: PanopticImageRecord) -> dict[str, Any]:  # type: ignore[override]
        sample = super()._blank_sample(rec)  # type: ignore[arg-type]
        sample["sem_seg"] = tv_tensors.Mask(
            torch.full((rec.height, rec.width), IGNORE_LABEL, dtype=torch.uint8)
        )
        return sample

    def _targets(self, rec: PanopticImageRecord, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(H, W) segment ids -> thing masks (N, H, W) bool, labels (N,) int64, sem_seg (H, W) uint8."""
        uniq, inverse, counts = torch.unique(
            ids, sorted=True, return_inverse=True, return_counts=True
        )
        _check_ids(rec, set(uniq.tolist()) - {0})
        position = {int(v): k for k, v in enumerate(uniq.tolist())}
        table = torch.full(
            (len(uniq),), IGNORE_LABEL, dtype=torch.uint8
        )  # position in uniq -> label
        things: list[tuple[int, int]] = []  # (position, label)
        for seg in rec.segments:
            if seg.iscrowd:
                continue
            if seg.isthing:
                things.append((position[seg.id], seg.category))
            else:
                table[position[seg.id]] = seg.category
        if self.train and 0 < self.max_instances < len(things):
            area = [int(counts[p]) for p, _ in things]
            keep = sorted(sorted(range(len(things)), key=lambda k: -area[k])[: self.max_instances])
            things = [things[k] for k in keep]
        pos = torch.tensor([p for p, _ in things], dtype=torch.int64)
        masks = inverse[None] == pos[:, None, None]
        labels = torch.tensor([c for _, c in things], dtype=torch.int64)
        return masks, labels, table[inverse]


def _read_ids(rec: PanopticImageRecord) -> Tensor:
    """The record's PNG as (H, W) int64 segment ids; all void (0) when it has no PNG."""
    if rec.panoptic_file is None:
        return torch.zeros(rec.height, rec.width, dtype=torch.int64)
    rgb = read_image(rec.panoptic_file)
    h, w = int(rgb.shape[-2]), int(rgb.shape[-1])
    if (h, w) != (rec.height, rec.width):
        raise DatasetError(
            f"{rec.panoptic_file}: panoptic PNG is {h}x{w} (HxW) but its image "
            f"{rec.file_name} is {rec.height}x{rec.width}"
        )
    return torch.from_numpy(rgb_to_id(rgb.permute(1, 2, 0).numpy()))


def _check_ids(rec: PanopticImageRecord, present: set[int]) -> None:
    """The non-void ids in the PNG must be exactly the JSON's segment ids."""
    listed = {s.id for s in rec.segments}
    absent, unlisted = sorted(listed - present), sorted(present - listed)
    if absent:
        raise DatasetError(
            f"{rec.panoptic_file}: segment id(s) {absent[:_MAX_LISTED]} of image id="
            f"{rec.image_id} in the JSON have no pixels in the PNG"
        )
    if unlisted:
        raise DatasetError(
            f"{rec.panoptic_file}: the PNG has segment id(s) {unlisted[:_MAX_LISTED]} that "
            f"image id={rec.image_id}'s segments_info does not list"
        )


def _mask_boxes(masks: Tensor) -> Tensor:
    """(N, H, W) bool non-empty masks -> (N, 4) float32 tight XYXY boxes (x1, y1 exclusive)."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.float32)
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)
    ys, xs = torch.arange(h), torch.arange(w)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    return torch.stack([x0, y0, x1, y1], dim=1).float()
