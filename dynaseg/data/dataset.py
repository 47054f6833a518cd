"""Map-style instance-segmentation dataset over validated COCO records.

Reproducible augmentation: each sample's transforms run under a private torch RNG seeded from
``(seed, epoch, index)``, so the same sample in the same epoch is augmented identically in any
process, worker count or after a resume. The epoch is carried by the index itself:
``dataset[epoch * len(dataset) + i]`` is image ``i`` as augmented in ``epoch`` (this is what
:class:`~dynaseg.data.samplers.TrainingSampler` yields). Indices below ``len(dataset)`` use the
epoch set by :meth:`InstanceDataset.set_epoch` (default 0), for use with ordinary samplers.

Unreadable samples (``on_error``): with "stop" an image that cannot be read raises
:class:`~dynaseg.data.image_io.ImageReadError` naming it (also from DataLoader workers). With "skip"
the file is reported once (a ``dynaseg.data`` warning naming it and the reason) and remembered:

* training: the item is the next readable image (``i + 1``, ``i + 2``, ... wrapping around), with
  that image's own augmentation, so the substitution is deterministic; when no image can be read,
  :class:`~dynaseg.data.coco.DatasetError` is raised instead of looping;
* evaluation (``train=False``): the item is a black image of the declared size with the same
  ``image_id`` and no targets, so the evaluator still predicts on it and its ground truth (read
  from the annotation file by the evaluator) still counts: a bad validation image costs recall
  instead of silently leaving the metrics.

The memory of bad files lives in the dataset object, so each DataLoader worker process reports a
bad file once (at most ``num_workers`` reports with workers, once with ``num_workers=0``), across
epochs as long as the workers persist (they do in training).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_util
from torch import Tensor
from torchvision import tv_tensors

from dynaseg.data.coco import AnnotationRecord, CocoInstances, DatasetError, ImageRecord
from dynaseg.data.image_io import ImageReadError, read_image
from dynaseg.data.packed import PackedRecords
from dynaseg.structures.instances import Instances

__all__ = ["Sample", "InstanceDataset", "derive_seed", "rasterize_masks", "SAMPLE_ERRORS"]

logger = logging.getLogger("dynaseg.data")

Transform = Callable[[dict[str, Any]], dict[str, Any]]  # v2 transform on the sample dict
# What reading one sample may raise on bad files (image, panoptic PNG); ``on_error="skip"`` skips these.
SAMPLE_ERRORS: tuple[type[Exception], ...] = (ImageReadError, DatasetError)

# pycocotools' Cython decode calls np.array(copy=False) on its own buffer; NumPy 2 warns about it
# on every call. Harmless (NumPy copies), and not ours to fix.
warnings.filterwarnings(
    "ignore",
    message=r"__array__ implementation doesn't accept a copy keyword",
    category=DeprecationWarning,
    module=r"pycocotools",
)


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


def rasterize_masks(
    annotations: tuple[AnnotationRecord, ...] | list[AnnotationRecord], height: int, width: int
) -> Tensor:
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
        train: apply ``max_instances``; with ``on_error="skip"``, substitute the next readable image
            (else a blank one, see the module docstring).
        max_instances: keep at most this many instances (largest boxes) per training image; 0 = all.
        seed: base seed of the per-sample augmentation RNG.
        on_error: "stop" raises image read errors (:class:`~dynaseg.data.image_io.ImageReadError`);
            "skip" reports each bad file once and substitutes (module docstring).
        image_cache_bytes: keep decoded images in memory up to this many bytes, filled as they are
            first read, so later epochs skip decoding; 0 = off. Each loading process (the main one
            or each DataLoader worker) holds its own cache.

    Instances whose mask is empty after the transforms (sub-pixel polygons, objects shrunk away by
    the resize) are dropped with their box and label; boxes are clamped to the image.
    """

    def __init__(
        self,
        instances: CocoInstances,
        transforms: Transform | None,
        *,
        train: bool,
        max_instances: int = 0,
        seed: int = 0,
        on_error: Literal["stop", "skip"] = "stop",
        image_cache_bytes: int = 0,
    ) -> None:
        if on_error not in ("stop", "skip"):
            raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
        if image_cache_bytes < 0:
            raise ValueError(f"image_cache_bytes must be >= 0, got {image_cache_bytes}")
        self.records: Sequence[ImageRecord] = instances.records
        self.class_names = instances.class_names
        self.json_path = instances.json_path
        self.transforms = transforms
        self.train = train
        self.max_instances = max_instances
        self.seed = seed
        self.on_error = on_error
        self.epoch = 0
        self._bad: dict[int, str] = {}  # record index -> error message, with on_error="skip"
        self._image_cache: dict[int, Tensor] = {}  # record index -> (3, H, W) uint8
        self._image_cache_room = image_cache_bytes

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for indices < len(self) (epoch-encoded indices override it)."""
        self.epoch = epoch

    def aspect_ratios(self) -> list[float]:
        """width / height of each record (from the annotations, no image reads)."""
        if isinstance(self.records, PackedRecords):  # from the arrays, no record built
            return self.records.aspect_ratios().tolist()
        return [r.width / r.height for r in self.records]

    def decode_index(self, index: int) -> tuple[int, int]:
        """``epoch * len(self) + i`` -> (epoch, i); plain indices get ``self.epoch``."""
        if index < 0 or not self.records:
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        epoch, i = divmod(index, len(self))
        return self.epoch + epoch, i

    def __getitem__(self, index: int) -> Sample:
        epoch, i = self.decode_index(int(index))
        if self.on_error == "stop":
            return self._load(epoch, i)
        if not self.train:
            if i not in self._bad:
                try:
                    return self._load(epoch, i)
                except SAMPLE_ERRORS as e:
                    self._report(i, e, "evaluated as a blank image, its ground truth still counts")
            return self._transform(epoch, i, self._blank_sample(self.records[i]))
        n = len(self.records)
        for j in ((i + k) % n for k in range(n)):
            if j in self._bad:
                continue
            try:
                return self._load(epoch, j)
            except SAMPLE_ERRORS as e:
                self._report(j, e, "the next readable image is used instead")
        first = self._bad[min(self._bad)]
        raise DatasetError(
            f"{self.json_path or 'dataset'}: none of the {n} images can be read, "
            f"data.on_error=skip has nothing to use instead (first: {first})"
        )

    def _load(self, epoch: int, i: int) -> Sample:
        """Image ``i`` as augmented in ``epoch``; raises the read errors."""
        rec = self.records[i]
        return self._transform(epoch, i, self._raw_sample(rec, self._read_image(i, rec)))

    def _read_image(self, i: int, rec: ImageRecord) -> Tensor:
        """Record ``i``'s image, (3, H, W) uint8: from the cache, or decoded (and cached if room)."""
        image = self._image_cache.get(i)
        if image is None:
            image = read_image(rec.file_name, (rec.height, rec.width))
            if image.numel() <= self._image_cache_room:  # uint8: one byte per element
                self._image_cache[i] = image
                self._image_cache_room -= image.numel()
        return image

    def _transform(self, epoch: int, i: int, sample: dict[str, Any]) -> Sample:
        if self.transforms is not None:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only (the transforms draw from it): torch.manual_seed would also
                # reseed any CUDA generators, which fork_rng(devices=[]) does not restore, and it
                # records a stack trace on each call (0.8 ms here, a quarter of the loader's time).
                torch.default_generator.manual_seed(derive_seed(self.seed, epoch, i))
                sample = self.transforms(sample)
        return self._to_sample(self.records[i], sample)

    def _report(self, i: int, error: Exception, action: str) -> None:
        """Remember record ``i`` as bad and warn, once per record (per process)."""
        self._bad[i] = str(error)
        logger.warning("%s [data.on_error=skip: %s; reported once]", error, action)

    def _blank_sample(self, rec: ImageRecord) -> dict[str, Any]:
        """A black image of the record's size without targets (stands in for an unreadable one)."""
        h, w = rec.height, rec.width
        return {
            "image": tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)),
            "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.bool)),
            "labels": torch.zeros(0, dtype=torch.int64),
        }

    def _select(self, rec: ImageRecord) -> list[AnnotationRecord]:
        """Non-crowd annotations, capped to the largest ``max_instances`` in training."""
        anns = [a for a in rec.annotations if not a.iscrowd]
        if self.train and 0 < self.max_instances < len(anns):
            area = [
                (a.bbox_xyxy[2] - a.bbox_xyxy[0]) * (a.bbox_xyxy[3] - a.bbox_xyxy[1]) for a in anns
            ]
            keep = sorted(sorted(range(len(anns)), key=lambda k: -area[k])[: self.max_instances])
            anns = [anns[k] for k in keep]
        return anns

    def _raw_sample(self, rec: ImageRecord, image: Tensor) -> dict[str, Any]:
        anns = self._select(rec)
        boxes = torch.tensor([a.bbox_xyxy for a in anns], dtype=torch.float32).reshape(-1, 4)
        return {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(
                boxes, format="XYXY", canvas_size=(rec.height, rec.width)
            ),
            "masks": tv_tensors.Mask(rasterize_masks(anns, rec.height, rec.width)),
            "labels": torch.tensor([a.category for a in anns], dtype=torch.int64),
        }

    @staticmethod
    def _to_sample(rec: ImageRecord, sample: dict[str, Any]) -> Sample:
        """Transformed sample dict -> :class:`Sample` (boxes clamped to the image, empty masks
        dropped); an optional ``sem_seg`` (h, w) map must have followed the image through the
        transforms."""
        image = sample["image"].as_subclass(Tensor)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        boxes = sample["boxes"].as_subclass(Tensor).float()
        limits = torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
        masks = sample["masks"].as_subclass(Tensor).bool()
        keep = masks.flatten(1).any(dim=1)
        target = Instances(
            image_size=size,
            boxes=boxes,
            labels=sample["labels"].as_subclass(Tensor).long(),
            masks=masks,
        )
        if not bool(keep.all()):
            target = target[keep]
        sem_seg = sample.get("sem_seg")
        if sem_seg is not None:
            sem_seg = sem_seg.as_subclass(Tensor).long()
            if tuple(sem_seg.shape) != size:
                raise ValueError(
                    f"{rec.file_name}: sem_seg is {tuple(sem_seg.shape)} after the transforms "
                    f"but the image is {size}; pass it as a tv_tensors.Mask"
                )
        return Sample(
            image=image,
            target=target,
            image_id=rec.image_id,
            original_size=(rec.height, rec.width),
            file_name=rec.file_name,
            sem_seg=sem_seg,
        )
