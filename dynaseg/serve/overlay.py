"""The overlay PNG: what ``dynaseg predict`` draws (``draw_instances``), one mask at a time."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynaseg.inference.predictor import stuff_categories

# The blending helpers of draw_instances itself, so that the overlay is the same to the bit.
from dynaseg.inference.visualize import (
    _boundary,
    _darker,
    _line_px,
    draw_instances,
    draw_panoptic,
    instance_colors,
)
from dynaseg.serve.inference import InstanceStream
from dynaseg.serve.rle import crop_rle, decode_crop
from dynaseg.structures import Instances
from dynaseg.structures.panoptic import PanopticSegmentation

__all__ = ["overlay_png"]

ALPHA = 0.5  # draw_instances' default mask opacity


def _blend_masks(image: np.ndarray, stream: InstanceStream, score_threshold: float) -> np.ndarray:
    """``image`` with the masks scoring at least ``score_threshold`` blended in, largest first, as
    ``draw_instances`` blends them: masks are pasted one at a time and kept as small RLEs of their
    windows (the order needs every area) until they are drawn."""
    colors = instance_colors(len(stream))
    windows = []
    for d, window in stream.masks(stream.above(score_threshold)):
        if window is not None:
            windows.append((window.area, d.index, crop_rle(window.pixels), window.top, window.left))
    windows.sort(key=lambda w: -w[0])  # stable: ties keep the score order
    canvas = image.astype(np.float32)
    thickness = _line_px(*image.shape[:2])
    for _, index, rle, top, left in windows:
        mask = decode_crop(rle)
        region = canvas[top : top + mask.shape[0], left : left + mask.shape[1]]
        inside = mask[:, :, None]
        # region[mask] * (1 - ALPHA) + color * ALPHA, in place: no copies of the masked pixels.
        np.multiply(region, 1.0 - ALPHA, out=region, where=inside)
        np.add(region, np.asarray(colors[index], np.float32) * ALPHA, out=region, where=inside)
        region[_boundary(mask, thickness)] = np.asarray(_darker(colors[index]), np.float32)
    canvas += 0.5  # rounded and clipped in place, as _to_uint8 does with copies
    np.clip(canvas, 0, 255, out=canvas)
    return canvas.astype(np.uint8)


def _boxes_and_tags(stream: InstanceStream) -> Instances:
    """The detections without masks: ``draw_instances`` then draws their boxes and tags only."""
    detections = stream.detections
    return Instances(
        image_size=stream.image_size,
        boxes=torch.tensor([d.box for d in detections], dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor([d.label for d in detections], dtype=torch.int64),
        scores=torch.tensor([d.score for d in detections], dtype=torch.float32),
    )


def overlay_png(
    image: np.ndarray,
    prediction: InstanceStream | PanopticSegmentation,
    *,
    predictor: Any,
    score_threshold: float,
) -> memoryview:
    """The prediction drawn on the (H, W, 3) image (as ``dynaseg predict`` does), PNG-encoded."""
    if isinstance(prediction, PanopticSegmentation):
        drawn = draw_panoptic(
            image,
            prediction,
            thing_names=predictor.class_names,
            stuff_names=stuff_categories(predictor)[1],
        )
    else:
        blended = _blend_masks(image, prediction, score_threshold)
        drawn = draw_instances(
            blended,
            _boxes_and_tags(prediction),
            predictor.class_names,
            score_threshold=score_threshold,
        )
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="PNG")
    return buffer.getbuffer()
