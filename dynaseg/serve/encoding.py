"""Predictions as service replies: JSON with COCO RLE masks, encoded one mask at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from dynaseg.evaluation.coco import encode_masks
from dynaseg.inference.predictor import stuff_categories
from dynaseg.serve.inference import InstanceStream
from dynaseg.serve.rle import window_rle
from dynaseg.structures import Instances
from dynaseg.structures.panoptic import PanopticSegmentation

__all__ = ["prediction_json", "json_bytes"]

_NO_PIXELS = np.zeros((0, 0), dtype=bool)  # the window of an empty mask


def _name(names: list[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else str(label)


def _category(ids: list[int], label: int) -> int | None:
    return int(ids[label]) if 0 <= label < len(ids) else None


def _instance_json(
    *, label: int, score: float | None, box: Any, mask: dict | None, predictor: Any
) -> dict[str, Any]:
    return {
        "class_id": int(label),
        "class_name": _name(predictor.class_names, label),
        "category_id": _category(predictor.category_ids, label),
        "score": None if score is None else round(float(score), 5),
        "box": [round(float(v), 2) for v in box],
        "mask": mask,
    }


def _streamed_instances_json(
    stream: InstanceStream, *, predictor: Any, score_threshold: float
) -> Iterator[dict[str, Any]]:
    """Only the instances the answer lists are pasted, each encoded before the next is pasted."""
    empty = window_rle(_NO_PIXELS, top=0, left=0, image_size=stream.image_size)
    for d, window in stream.masks(stream.above(score_threshold)):
        rle = empty
        if window is not None:
            rle = window_rle(
                window.pixels, top=window.top, left=window.left, image_size=stream.image_size
            )
        yield _instance_json(label=d.label, score=d.score, box=d.box, mask=rle, predictor=predictor)


def _pasted_instances_json(
    instances: Instances | None, *, predictor: Any, score_threshold: float
) -> Iterator[dict[str, Any]]:
    """Instances whose masks are already pasted (panoptic models), encoded one at a time."""
    if instances is None:
        return
    scores = instances.scores.tolist() if instances.scores is not None else [None] * len(instances)
    for i, (label, score, box) in enumerate(
        zip(instances.labels.tolist(), scores, instances.boxes.tolist())
    ):
        if score is not None and score < score_threshold:
            continue
        mask = None if instances.masks is None else encode_masks(instances.masks[i : i + 1])[0]
        yield _instance_json(label=label, score=score, box=box, mask=mask, predictor=predictor)


def _segments_json(pan: PanopticSegmentation, predictor: Any) -> Iterator[dict[str, Any]]:
    stuff_ids, stuff_names = stuff_categories(predictor)
    ids = pan.ids.numpy()
    for s in sorted(pan.segments, key=lambda s: s.id):
        names, cats = (
            (predictor.class_names, predictor.category_ids)
            if s.isthing
            else (stuff_names, stuff_ids)
        )
        yield {
            "id": int(s.id),
            "isthing": bool(s.isthing),
            "class_id": int(s.label),
            "class_name": _name(names, s.label),
            "category_id": _category(cats, s.label),
            "score": round(float(s.score), 5),
            "area": int(s.area),
            "mask": encode_masks((ids == s.id)[None])[0],
        }


def prediction_json(
    prediction: InstanceStream | PanopticSegmentation,
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
        result["instances"] = list(
            _pasted_instances_json(
                prediction.instances, predictor=predictor, score_threshold=score_threshold
            )
        )
        result["segments"] = list(_segments_json(prediction, predictor))
    else:
        result["instances"] = list(
            _streamed_instances_json(
                prediction, predictor=predictor, score_threshold=score_threshold
            )
        )
    return result


def json_bytes(document: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as FastAPI's ``JSONResponse`` writes it."""
    return json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8"
    )
