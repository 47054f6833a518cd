"""Map-style instance-segmentation dataset over validated COCO records.

Reproducible augmentation: each sample's transforms run under a private torch RNG seeded from
``(seed, epoch, index)``, so the same sample in the same epoch is augmented identically in any
process, worker count or after a resume. The epoch is carried by the index itself:
``dataset[epoch * len(dataset) + i]`` is image ``i`` as augmented in ``epoch`` (this is what
:class:`~dynaseg.data.samplers.TrainingSampler` yields). Indices below ``len(dataset)`` use the
epoch set by :meth:`InstanceDataset.set_epoch` (default 0), for use with ordinary samplers.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from torch import Tensor
from torchvision import tv_tensors

from dynaseg.data.coco import AnnotationRecord, CocoInstances, ImageRecord
from dynaseg.data.image_io import read_image
from dynaseg.structures.instances import Instances

__all__ = ["Sample", "InstanceDataset", "derive_seed", "rasterize_masks"]

Transform = Callable[[dict[str, Any]], dict[str, Any]]  # v2 transform on the sample dict

# pycocotools' Cython decode calls np.array(copy=False) on its own buffer; NumPy 2 warns about it
# on every call. Harmless (NumPy copies), and not ours to fix.
warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                        category=DeprecationWarning, module=r"pycocotools")


@dataclass
class Sample:
    """One transformed image with its ground truth.

    Attributes:
        image: (3, h, w) uint8 RGB after transforms.
        target: non-crowd instances at (h, w): boxes (N, 4) float32 XYXY, labels (N,) int64,
            masks (N, h, w) bool.
        image_id: COCO image id.
        original_size: (H, W) as stored on disk.
        file_name: absolute image path.
        sem_seg: (h, w) int64 semantic map at the transformed size (panoptic data: contiguous stuff
            id, or ``IGNORE_LABEL`` = 255 on void, crowd and thing pixels); None for instance data.
    """

    image: Tensor
    target: Instances
    image_id: int
    original_size: tuple[int, int]
    file_name: str
    sem_seg: Tensor | None = None


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, index); stable across runs."""
    state = np.random.SeedSequence([v % (1 << 64) for v in values]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def rasterize_masks(annotations: tuple[AnnotationRecord, ...] | list[AnnotationRecord],
                    height: int, width: int) -> Tensor:
    """Polygons / RLEs -> (N, height, width) bool (polygon parts of one object merged)."""
    if not annotations:
        return torch.zeros(0, height, width, dtype=torch.bool)
    rles = [_to_rle(a.segmentation, height, width) for a in annotations]
    masks = mask_util.decode(rles)  # (H, W, N) uint8, Fortran order
    return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))).bool()


def _to_rle(seg: list | dict, height: int, width: int) -> dict:
    if isinstance(seg, list):  # polygons
        return mask_util.merge(mask_util.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):  # uncompressed RLE
        return mask_util.frPyObjects(seg, height, width)
    return {"size": [height, width], "counts": seg["counts"].encode("ascii")}


class InstanceDataset(torch.utils.data.Dataset):
    """Reads, rasterises and transforms one image per item.

    Args:
        instances: validated dataset (``load_coco_instances``).
        transforms: v2 transform on the sample dict (see ``dynaseg.data.transforms``); None = identity.
        train: apply ``max_instances``.
        max_instances: keep at most this many instances (largest boxes) per training image; 0 = all.
        seed: base seed of the per-sample augmentation RNG.

    Image read errors propagate as :class:`~dynaseg.data.image_io.ImageReadError`.
    """

    def __init__(self, instances: CocoInstances, transforms: Transform | None, *, train: bool,
                 max_instances: int = 0, seed: int = 0) -> None:
        self.records: list[ImageRecord] = instances.records
        self.class_names = instances.class_names
        self.transforms = transforms
        self.train = train
        self.max_instances = max_instances
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for indices < len(self) (epoch-encoded indices override it)."""
        self.epoch = epoch

    def aspect_ratios(self) -> list[float]:
        """width / height of each record (from the annotations, no image reads)."""
        return [r.width / r.height for r in self.records]

    def decode_index(self, index: int) -> tuple[int, int]:
        """``epoch * len(self) + i`` -> (epoch, i); plain indices get ``self.epoch``."""
        if index < 0 or not self.records:
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        epoch, i = divmod(index, len(self))
        return self.epoch + epoch, i

    def __getitem__(self, index: int) -> Sample:
        epoch, i = self.decode_index(int(index))
        rec = self.records[i]
        image = read_image(rec.file_name, (rec.height, rec.width))
        sample = self._raw_sample(rec, image)
        if self.transforms is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, epoch, i))
                sample = self.transforms(sample)
        return self._to_sample(rec, sample)

    def _select(self, rec: ImageRecord) -> list[AnnotationRecord]:
        """Non-crowd annotations, capped to the largest ``max_instances`` in training."""
        anns = [a for a in rec.annotations if not a.iscrowd]
        if self.train and 0 < self.max_instances < len(anns):
            area = [(a.bbox_xyxy[2] - a.bbox_xyxy[0]) * (a.bbox_xyxy[3] - a.bbox_xyxy[1]) for a in anns]
            keep = sorted(sorted(range(len(anns)), key=lambda k: -area[k])[: self.max_instances])
            anns = [anns[k] for k in keep]
        return anns

    def _raw_sample(self, rec: ImageRecord, image: Tensor) -> dict[str, Any]:
        anns = self._select(rec)
        boxes = torch.tensor([a.bbox_xyxy for a in anns], dtype=torch.float32).reshape(-1, 4)
        return {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(rec.height, rec.width)),
            "masks": tv_tensors.Mask(rasterize_masks(anns, rec.height, rec.width)),
            "labels": torch.tensor([a.category for a in anns], dtype=torch.int64),
        }

    @staticmethod
    def _to_sample(rec: ImageRecord, sample: dict[str, Any]) -> Sample:
        """Transformed sample dict -> :class:`Sample`; an optional ``sem_seg`` (h, w) map must have
        followed the image through the transforms."""
        image = sample["image"].as_subclass(Tensor)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        target = Instances(
            image_size=size,
            boxes=sample["boxes"].as_subclass(Tensor).float(),
            labels=sample["labels"].as_subclass(Tensor).long(),
            masks=sample["masks"].as_subclass(Tensor).bool(),
        )
        sem_seg = sample.get("sem_seg")
        if sem_seg is not None:
            sem_seg = sem_seg.as_subclass(Tensor).long()
            if tuple(sem_seg.shape) != size:
                raise ValueError(f"{rec.file_name}: sem_seg is {tuple(sem_seg.shape)} after the transforms "
                                 f"but the image is {size}; pass it as a tv_tensors.Mask")
        return Sample(image=image, target=target, image_id=rec.image_id,
                      original_size=(rec.height, rec.width), file_name=rec.file_name, sem_seg=sem_seg)
