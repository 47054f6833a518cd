"""Write panoptic predictions as COCO panoptic files: one RGB-id PNG per image plus one JSON.

Typical use::

    entries = []
    for image_id, name, pan in predictions:
        png, ann = panoptic_to_coco(pan, image_id=image_id, file_name=name,
                                    thing_category_ids=things, stuff_category_ids=stuff)
        entries.append((ann, png))
    write_panoptic_predictions(entries, json_path="pred.json", png_dir="pred/", categories=categories)
    metrics = pq_compute("gt.json", "gt/", "pred.json", "pred/")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynaseg.structures.panoptic import PanopticSegmentation, id_to_rgb

__all__ = ["panoptic_to_coco", "write_panoptic_predictions"]


def _boxes(ids: np.ndarray, uniq: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """(K, 4) [x, y, w, h] of each id in ``uniq`` from the (H, W) map and its unique-inverse."""
    H, W = ids.shape
    inv = inverse.reshape(H, W)
    rows = np.zeros((len(uniq), H), bool)
    cols = np.zeros((len(uniq), W), bool)
    rows[inv, np.arange(H)[:, None]] = True
    cols[inv, np.arange(W)[None, :]] = True
    y0, x0 = rows.argmax(1), cols.argmax(1)
    y1, x1 = H - 1 - rows[:, ::-1].argmax(1), W - 1 - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1)


def panoptic_to_coco(
    pan: PanopticSegmentation,
    *,
    image_id: int,
    file_name: str,
    thing_category_ids: Sequence[int],
    stuff_category_ids: Sequence[int],
) -> tuple[np.ndarray, dict[str, Any]]:
    """One prediction → (H, W, 3) uint8 COCO panoptic PNG array and its annotation dict.

    Args:
        pan: the prediction; a thing's ``label`` indexes ``thing_category_ids``, a stuff
            segment's indexes ``stuff_category_ids``.
        image_id: COCO image id.
        file_name: the image's file name; the annotation's ``file_name`` is its base name with a
            ``.png`` suffix.

    Returns:
        ``(png, {"image_id", "file_name", "segments_info": [{"id", "category_id", "isthing",
        "area" (pixels), "bbox" [x, y, w, h] (pixels), "iscrowd": 0, "score"}]})``. Segments with
        no pixels are left out (the COCO API rejects them).

    Raises:
        ValueError: an id in the map has no segment, or a label is out of range.
    """
    ids = pan.ids.detach().cpu().numpy().astype(np.int64)
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    segments = {int(s.id): s for s in pan.segments}
    unlisted = [int(i) for i in uniq if i != 0 and int(i) not in segments]
    if unlisted:
        raise ValueError(
            f"image {image_id}: segment ids {unlisted[:10]} are in the id map but not in segments"
        )
    boxes = _boxes(ids, uniq, inverse.ravel())
    index = {int(i): k for k, i in enumerate(uniq.tolist())}
    infos = []
    for s in sorted(pan.segments, key=lambda s: s.id):
        k = index.get(int(s.id))
        if k is None:
            continue
        table = thing_category_ids if s.isthing else stuff_category_ids
        if not 0 <= s.label < len(table):
            kind = "thing" if s.isthing else "stuff"
            raise ValueError(
                f"image {image_id}: segment {s.id} has {kind} label {s.label}, "
                f"out of range for {len(table)} {kind} categories"
            )
        infos.append(
            {
                "id": int(s.id),
                "category_id": int(table[s.label]),
                "isthing": bool(s.isthing),
                "area": int(counts[k]),
                "bbox": [int(v) for v in boxes[k]],
                "iscrowd": 0,
                "score": float(s.score),
            }
        )
    ann = {
        "image_id": int(image_id),
        "file_name": Path(file_name).with_suffix(".png").name,
        "segments_info": infos,
    }
    return id_to_rgb(ids), ann


def write_panoptic_predictions(
    entries: Iterable[tuple[Mapping[str, Any], np.ndarray]],
    *,
    json_path: str | os.PathLike,
    png_dir: str | os.PathLike,
    categories: Sequence[Mapping[str, Any]],
) -> Path:
    """Write ``(annotation, (H, W, 3) uint8 png)`` pairs as ``png_dir/<file_name>`` and one JSON.

    Each file is written under a temporary name and then renamed, so a reader never sees a
    half-written file. Returns the JSON path.
    """
    from PIL import Image

    from dynaseg.utils.files import atomic_write

    json_path, png_dir = Path(json_path), Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)
    annotations, seen = [], set()
    for ann, png in entries:
        name = str(ann["file_name"])
        if name in seen:
            raise ValueError(f"{json_path}: file_name {name!r} is used by two annotations")
        seen.add(name)
        png = np.asarray(png)
        if png.dtype != np.uint8 or png.ndim != 3 or png.shape[2] != 3:
            raise ValueError(
                f"{png_dir / name}: expected an (H, W, 3) uint8 array, got {png.dtype} {png.shape}"
            )
        atomic_write(
            png_dir / name, lambda tmp, png=png: Image.fromarray(png).save(tmp, format="PNG")
        )
        annotations.append(dict(ann))
    data = {"annotations": annotations, "categories": [dict(c) for c in categories]}
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
    return json_path
