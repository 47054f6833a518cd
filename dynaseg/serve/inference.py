"""Segmentation for the service, one instance at a time.

``Predictor(image)`` pastes every detection's mask at the image's size at once: (N, H, W) bools
for N up to 100 detections. Here the model runs up to its raw detections (``predict_raw``, as
``Predictor`` does), then the instances the answer needs are pasted by the model's own
post-processing one at a time (a few at a time for small images), cropped to their pixels and
handed on before the next ones: peak memory depends on the image size, not on the number of
detections.

Panoptic models keep the model's whole post-processing (the panoptic map needs every detection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import clip_boxes_to_image

from dynaseg.data.transforms import build_test_transforms
from dynaseg.modeling.one_stage.postprocess import nonempty_boxes
from dynaseg.modeling.rcnn.model import rcnn_postprocess
from dynaseg.structures import Batch, Instances
from dynaseg.structures.detections import RawDetections
from dynaseg.structures.masks import scale_boxes
from dynaseg.structures.panoptic import PanopticSegmentation

__all__ = ["Detection", "MaskWindow", "InstanceStream", "segment"]

MASK_PIXELS_AT_ONCE = 2**21  # full-image masks pasted together: 2 MiB of bools


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detection at the image's size. ``index``: its rank among all kept detections."""

    index: int
    box: tuple[float, float, float, float]
    label: int
    score: float


@dataclasses.dataclass(frozen=True)
class MaskWindow:
    """A mask as its tight bounding window: ``pixels`` (h, w) bool at (``top``, ``left``)."""

    pixels: np.ndarray
    top: int
    left: int

    @property
    def area(self) -> int:
        return int(self.pixels.sum())


class InstanceStream:
    """An instance model's detections of one image, masks pasted on demand, one at a time.

    ``detections`` are those the model's post-processing keeps (box not empty at the image's
    size), by decreasing score, as ``Predictor`` returns them.
    """

    def __init__(
        self,
        *,
        model: Any,
        raw: RawDetections,
        paired: bool,
        input_size: tuple[int, int],
        image_size: tuple[int, int],
    ) -> None:
        self.model = model
        self.raw = raw
        self.paired = paired  # model.postprocess takes (raw, panoptic maps)
        self.input_size = input_size
        self.image_size = image_size
        boxes = clip_boxes_to_image(scale_boxes(raw.boxes, input_size, image_size), image_size)
        self._rows = nonempty_boxes(boxes).nonzero().squeeze(1).tolist()
        self.detections = [
            Detection(
                index=k,
                box=tuple(boxes[row].tolist()),
                label=int(raw.labels[row]),
                score=float(raw.scores[row]),
            )
            for k, row in enumerate(self._rows)
        ]

    def __len__(self) -> int:
        return len(self.detections)

    def above(self, score_threshold: float) -> Iterator[Detection]:
        return (d for d in self.detections if d.score >= score_threshold)

    def masks(
        self, detections: Iterable[Detection]
    ) -> Iterator[tuple[Detection, MaskWindow | None]]:
        """Each detection with its mask cropped to its pixels (None: empty), pasted at the image's
        size by the model's post-processing a few at a time: as many as ``MASK_PIXELS_AT_ONCE``
        mask pixels allow (one for a large image; all of them for a small one, where one call per
        instance would cost more than the pasting)."""
        height, width = self.image_size
        at_once = max(1, MASK_PIXELS_AT_ONCE // (height * width))
        chunk: list[Detection] = []
        for detection in detections:
            chunk.append(detection)
            if len(chunk) == at_once:
                yield from self._paste(chunk)
                chunk = []
        if chunk:
            yield from self._paste(chunk)

    def _paste(self, chunk: list[Detection]) -> Iterator[tuple[Detection, MaskWindow | None]]:
        with torch.inference_mode():
            rows = torch.tensor([self._rows[d.index] for d in chunk], device=self.raw.boxes.device)
            pasted = self._postprocess(RawDetections(*(t[rows] for t in self.raw)))
        if len(pasted) != len(chunk) or pasted.masks is None:
            raise RuntimeError(f"post-processing {len(chunk)} detections gave {len(pasted)}")
        for d, mask in zip(chunk, pasted.masks):
            yield d, _window(mask)  # one crop at a time

    def _postprocess(self, raw: RawDetections) -> Instances:
        sizes = {"input_size": self.input_size, "output_size": self.image_size}
        if hasattr(self.model, "postprocess"):  # one-stage models
            return self.model.postprocess((raw, None) if self.paired else raw, **sizes)
        return rcnn_postprocess(  # two-stage models (TwoStageDetector.forward)
            raw, mask_threshold=self.model.mask_threshold, paste=self.model.mask_paste, **sizes
        )


def _window(mask: torch.Tensor) -> MaskWindow | None:
    """(H, W) bool → its tight bounding window on the CPU; None when empty."""
    rows = mask.any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    cols = mask.any(dim=0).nonzero().squeeze(1)
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return MaskWindow(pixels=mask[top:bottom, left:right].cpu().numpy(), top=top, left=left)


def _model_input(predictor: Any, image: np.ndarray) -> Batch:
    """``image`` (H, W, 3) uint8 as ``Predictor`` feeds it to the model: resized, padded, on its device."""
    cfg = predictor.cfg
    original = torch.from_numpy(image).permute(2, 0, 1)
    resize = build_test_transforms(cfg.data.min_size_test, cfg.data.max_size_test)
    resized = resize(tv_tensors.Image(original)).as_subclass(torch.Tensor)
    batch = Batch.from_images(
        [resized],
        size_divisibility=cfg.model.size_divisibility,
        original_sizes=[tuple(original.shape[-2:])],
    )
    return batch.to(predictor.device, memory_format=predictor.memory_format)


@torch.inference_mode()
def segment(predictor: Any, image: np.ndarray) -> InstanceStream | PanopticSegmentation:
    """The prediction for ``image`` (H, W, 3) uint8, writable: an :class:`InstanceStream` for
    instance models, the (CPU) :class:`PanopticSegmentation` for panoptic ones."""
    batch = _model_input(predictor, image)
    model = predictor.model
    (output,) = model.predict_raw(batch.images, batch.image_sizes)
    paired = not isinstance(output, RawDetections)  # DR1Mask: (detections, panoptic maps)
    raw, maps = output if paired else (output, None)
    input_size, image_size = batch.image_sizes[0], batch.original_sizes[0]
    if maps is not None:
        result = model.postprocess(output, input_size=input_size, output_size=image_size)
        instances = None if result.instances is None else result.instances.to("cpu")
        return dataclasses.replace(result, ids=result.ids.cpu(), instances=instances)
    return InstanceStream(
        model=model, raw=raw, paired=paired, input_size=input_size, image_size=image_size
    )
