"""Generate annotation files of COCO's (or LVIS's) size: the input of ``dynaseg bench data``.

Only the annotations are generated (no image files): the bench measures loading, sampling and
evaluating the annotations. Shapes follow COCO train2017's statistics: 118 287 images of about
640 × 480, 860 001 instances, star-shaped polygons of 8 to 40 vertices (one part, 10 % of them two),
coordinates with two decimals, 1 % crowd regions as uncompressed RLE.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orjson

__all__ = ["COCO_TRAIN_SIZE", "LVIS_TRAIN_SIZE", "write_coco_sized", "write_detections"]

COCO_TRAIN_SIZE = (118_287, 860_001)  # images, instances
LVIS_TRAIN_SIZE = (100_170, 1_270_141)
_NUM_CLASSES = 80
_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375))  # (w, h)


def _polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, w: int, h: int) -> list:
    n = int(rng.integers(8, 41))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + r * np.cos(angles), 0, w - 1)
    ys = np.clip(cy + r * np.sin(angles), 0, h - 1)
    return np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()


def _crowd_rle(rng: np.random.Generator, w: int, h: int, box: list[float]) -> dict:
    """An uncompressed RLE (column-major run lengths) of the box, as COCO stores crowd regions."""
    x0, y0, bw, bh = (int(v) for v in box)
    mask = np.zeros((h, w), np.uint8)
    mask[y0 : y0 + max(bh, 1), x0 : x0 + max(bw, 1)] = 1
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]]))
    counts = runs.tolist() if flat[0] == 0 else [0, *runs.tolist()]
    return {"size": [h, w], "counts": counts}


def write_coco_sized(
    path: str | os.PathLike,
    *,
    num_images: int = COCO_TRAIN_SIZE[0],
    num_instances: int = COCO_TRAIN_SIZE[1],
    lvis: bool = False,
    seed: int = 0,
) -> Path:
    """Write a COCO instances file (``lvis``: LVIS v1-style, 1203 categories with frequencies and
    the federated image lists) of the given size; returns its path."""
    rng = np.random.default_rng(seed)
    num_classes = 1203 if lvis else _NUM_CLASSES
    categories = [
        {"id": c + 1, "name": f"class_{c + 1}", "supercategory": "thing"}
        | ({"frequency": "rcf"[c % 3]} if lvis else {})
        for c in range(num_classes)
    ]
    per_image = rng.multinomial(num_instances, np.full(num_images, 1 / num_images))
    images, annotations = [], []
    for i in range(num_images):
        w, h = _SIZES[int(rng.integers(len(_SIZES)))]
        image = {"id": i + 1, "height": h, "width": w}
        if lvis:
            image["coco_url"] = f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg"
            image["neg_category_ids"] = rng.integers(1, num_classes + 1, 3).tolist()
            image["not_exhaustive_category_ids"] = []
        else:
            image["file_name"] = f"{i + 1:012d}.jpg"
        images.append(image)
        for _ in range(int(per_image[i])):
            radius = float(rng.choice([8.0, 30.0, 90.0]) * rng.uniform(0.5, 1.5))
            cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
            box = [
                round(max(cx - radius, 0.0), 2),
                round(max(cy - radius, 0.0), 2),
                round(min(2 * radius, w - max(cx - radius, 0.0)), 2),
                round(min(2 * radius, h - max(cy - radius, 0.0)), 2),
            ]
            crowd = not lvis and rng.random() < 0.01
            if crowd:
                seg = _crowd_rle(rng, w, h, box)
            else:
                parts = 2 if rng.random() < 0.1 else 1
                seg = [_polygon(rng, cx, cy, radius / parts, w, h) for _ in range(parts)]
            ann = {
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": int(rng.integers(1, num_classes + 1)),
                "bbox": box,
                "area": round(box[2] * box[3] * 0.7, 2),
                "segmentation": seg,
            }
            if not lvis:
                ann["iscrowd"] = int(crowd)
            annotations.append(ann)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_bytes(orjson.dumps(data))
    return path


def write_detections(
    gt_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_images: int = 5000,
    per_image: int = 100,
    seed: int = 0,
) -> Path:
    """A results file of ``per_image`` detections with RLE masks for each of the first
    ``num_images`` images of ``gt_path``."""
    import pycocotools.mask as mask_utils

    rng = np.random.default_rng(seed)
    gt = orjson.loads(Path(gt_path).read_bytes())
    num_classes = len(gt["categories"])
    results = []
    for image in gt["images"][:num_images]:
        h, w = image["height"], image["width"]
        boxes = np.empty((per_image, 4))
        boxes[:, :2] = rng.uniform(0, [w - 8, h - 8], (per_image, 2))
        boxes[:, 2:] = rng.uniform(4, 120, (per_image, 2))
        boxes[:, 2] = np.minimum(boxes[:, 2], w - boxes[:, 0])
        boxes[:, 3] = np.minimum(boxes[:, 3], h - boxes[:, 1])
        rles = mask_utils.frPyObjects(boxes, h, w)  # (N, 4) array: box-shaped RLEs
        scores = rng.uniform(0, 1, per_image)
        for box, rle, score in zip(boxes.round(2).tolist(), rles, scores.tolist()):
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.integers(1, num_classes + 1)),
                    "bbox": box,
                    "score": round(score, 4),
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                }
            )
    out = Path(out)
    out.write_bytes(orjson.dumps(results))
    return out
