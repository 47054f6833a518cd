"""Predictions as service responses: JSON with COCO RLE masks, or an overlay PNG."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from dynaseg.evaluation.coco import encode_masks
from dynaseg.inference.predictor import stuff_categories
from dynaseg.inference.visualize import draw_instances, draw_panoptic
from dynaseg.structures import Instances
from dynaseg.structures.panoptic import PanopticSegmentation

__all__ = ["prediction_json", "overlay_png"]


def _name(names: list[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else str(label)


def _category(ids: list[int], label: int) -> int | None:
    return int(ids[label]) if 0 <= label < len(ids) else None


def _instances_json(
    instances: Instances | None, predictor: Any, score_threshold: float
) -> list[dict]:
    if instances is None or len(instances) == 0:
        return []
    if instances.scores is not None:
        instances = instances[instances.scores >= score_threshold]
    rles = encode_masks(instances.masks) if instances.masks is not None else [None] * len(instances)
    scores = instances.scores.tolist() if instances.scores is not None else [None] * len(instances)
    out = []
    for label, score, box, rle in zip(
        instances.labels.tolist(), scores, instances.boxes.tolist(), rles
    ):
        out.append(
            {
                "class_id": int(label),
                "class_name": _name(predictor.class_names, label),
                "category_id": _category(predictor.category_ids, label),
                "score": None if score is None else round(float(score), 5),
                "box": [round(float(v), 2) for v in box],
                "mask": rle,
            }
        )
    return out


def _segments_json(pan: PanopticSegmentation, predictor: Any) -> list[dict]:
    stuff_ids, stuff_names = stuff_categories(predictor)
    ids = pan.ids.numpy()
    out = []
    for s in sorted(pan.segments, key=lambda s: s.id):
        names, cats = (
            (predictor.class_names, predictor.category_ids)
            if s.isthing
            else (stuff_names, stuff_ids)
        )
        out.append(
            {
                "id": int(s.id),
                "isthing": bool(s.isthing),
                "class_id": int(s.label),
                "class_name": _name(names, s.label),
                "category_id": _category(cats, s.label),
                "score": round(float(s.score), 5),
                "area": int(s.area),
                "mask": encode_masks((ids == s.id)[None])[0],
            }
        )  # one mask at a time: bounded memory
    return out


def prediction_json(
    prediction: Instances | PanopticSegmentation,
    *,
    image_size: tuple[int, int],
    predictor: Any,
    score_threshold: float,
) -> dict[str, Any]:
    """``{"image": {width, height}, "instances": [...]}`` (+ ``"segments"`` for panoptic models).

    Instances scoring below ``score_threshold`` are left out; panoptic segments are final (the
    model thresholds them itself). Masks are COCO RLE dicts ``{"size": [h, w], "counts": str}``.
    """
    h, w = image_size
    result: dict[str, Any] = {
        "image": {"width": int(w), "height": int(h)},
        "score_threshold": score_threshold,
    }
    if isinstance(prediction, PanopticSegmentation):
        result["instances"] = _instances_json(prediction.instances, predictor, score_threshold)
        result["segments"] = _segments_json(prediction, predictor)
    else:
        result["instances"] = _instances_json(prediction, predictor, score_threshold)
    return result


def overlay_png(
    image: np.ndarray,
    prediction: Instances | PanopticSegmentation,
    *,
    predictor: Any,
    score_threshold: float,
) -> bytes:
    """The prediction drawn on the (H, W, 3) image (as ``dynaseg predict`` does), PNG-encoded."""
    if isinstance(prediction, PanopticSegmentation):
        drawn = draw_panoptic(
            image,
            prediction,
            thing_names=predictor.class_names,
            stuff_names=stuff_categories(predictor)[1],
        )
    else:
        drawn = draw_instances(
            image, prediction, predictor.class_names, score_threshold=score_threshold
        )
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="PNG")
    return buffer.getvalue()
