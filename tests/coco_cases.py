"""Small COCO instance files for the data tests: noisy images with red polygons, and their JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

RED = (255, 0, 0)


def draw_image(
    path: Path, size_hw: tuple[int, int], polygons: list[list[float]], seed: int
) -> None:
    """Dark noisy background with the given polygons filled red (lossless PNG unless .jpg)."""
    h, w = size_hw
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for p in polygons:
        draw.polygon([(p[i], p[i + 1]) for i in range(0, len(p), 2)], fill=RED)
    img.save(path)


def rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def coco_annotation(
    aid: int, image_id: int, cat: int, bbox: list[float], seg, iscrowd: int = 0
) -> dict:
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "segmentation": seg,
        "iscrowd": iscrowd,
    }


def write_coco(root: Path, images: list[dict], anns: list[dict], cats=None) -> Path:
    cats = cats or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def write_six_images(root: Path) -> tuple[Path, Path]:
    """6 images (landscape and portrait), polygons + RLE + crowd, one image without annotations."""
    img_dir = root / "images"
    img_dir.mkdir()
    images, anns, aid = [], [], 1
    sizes = [(48, 64), (64, 48), (40, 70), (72, 40), (50, 50), (44, 60)]
    for i, (h, w) in enumerate(sizes):
        image_id = 100 + i
        polys = (
            []
            if i == 4
            else [rect(4, 6, w // 2, h // 2), rect(w // 2 + 3, h // 2 + 2, w - 5, h - 4)]
        )
        draw_image(img_dir / f"{image_id}.png", (h, w), polys, seed=i)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for k, p in enumerate(polys):
            bbox = [p[0], p[1], p[2] - p[0], p[5] - p[1]]
            seg: list | dict = [p]
            if k == 1 and i % 2:  # every other second object as compressed RLE
                m = np.zeros((h, w), np.uint8, order="F")
                m[int(p[1]) : int(p[5]), int(p[0]) : int(p[2])] = 1
                rle = mask_util.encode(m)
                seg = {"size": [h, w], "counts": rle["counts"].decode()}
            anns.append(coco_annotation(aid, image_id, 7 if k == 0 else 3, bbox, seg))
            aid += 1
    anns.append(coco_annotation(aid, 100, 3, [0, 0, 10, 10], [rect(0, 0, 10, 10)], iscrowd=1))
    return write_coco(root, images, anns), img_dir
