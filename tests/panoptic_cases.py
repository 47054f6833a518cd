"""Shared panoptic fixtures for the PQ tests: four categories, a 10×10 image, and panoptic files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynaseg.evaluation.panoptic import pq_compute_arrays
from dynaseg.structures.panoptic import id_to_rgb

CATEGORIES = [
    {"id": 1, "name": "cat", "isthing": 1},
    {"id": 2, "name": "dog", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "grass", "isthing": 0},
]
CAT, DOG, SKY, GRASS = 1, 2, 3, 4


def seg(sid: int, category_id: int, iscrowd: int = 0) -> dict:
    return {"id": sid, "category_id": category_id, "iscrowd": iscrowd}


def base_gt() -> tuple[np.ndarray, list[dict]]:
    """10×10: sky rows 0-3 (40 px), cat A rows 4-7 cols 0-4 (20), cat B rows 8-9 cols 0-4 (10),
    grass rows 4-9 cols 5-9 (30)."""
    ids = np.zeros((10, 10), np.int64)
    ids[0:4] = 1
    ids[4:10, 5:] = 2
    ids[4:8, :5] = 3
    ids[8:10, :5] = 4
    return ids, [seg(1, SKY), seg(2, GRASS), seg(3, CAT), seg(4, CAT)]


def pq(gt_ids, gt_segments, pred_ids, pred_segments, categories=CATEGORIES) -> dict:
    return pq_compute_arrays(
        [(gt_ids, gt_segments, pred_ids, pred_segments)], categories=categories
    )


def check(row: dict, PQ: float, SQ: float, RQ: float, N: int | None = None) -> None:
    assert row["PQ"] == pytest.approx(100 * PQ)
    assert row["SQ"] == pytest.approx(100 * SQ)
    assert row["RQ"] == pytest.approx(100 * RQ)
    if N is not None:
        assert row["N"] == N and isinstance(row["N"], int)


def write_panoptic(
    root: Path,
    name: str,
    images: list[tuple[int, np.ndarray, list[dict]]],
    categories: list[dict] | None = CATEGORIES,
) -> tuple[Path, Path]:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    anns = []
    for image_id, ids, segments in images:
        Image.fromarray(id_to_rgb(ids)).save(folder / f"{image_id:06d}.png")
        anns.append(
            {"image_id": image_id, "file_name": f"{image_id:06d}.png", "segments_info": segments}
        )
    data = {"annotations": anns}
    if categories is not None:
        data["categories"] = categories
    (root / f"{name}.json").write_text(json.dumps(data))
    return root / f"{name}.json", folder
