"""Boundary AP (``iou_types=("boundary",)``) against an independent Boundary IoU computation.

Cheng et al. 2021 (Boundary IoU): the boundary region of a mask is the mask minus its erosion by
d = round(0.02 · image diagonal) pixels (3×3 square element, outside the image counts as
background); Boundary AP matches detections with min(mask IoU, boundary IoU). Here that IoU is
computed with torch max-pooling and compared with what the evaluation matches on; then a
detection set whose AP follows from those IoUs by hand.
"""

import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from torch.nn import functional as F

from dynaseg.evaluation.coco import EvaluationError, evaluate_coco

H, W = 64, 80


def _boundary(mask: np.ndarray, d: int) -> np.ndarray:
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    eroded = m
    for _ in range(d):  # erosion = 1 − max-pool of the complement, zero (background) outside
        eroded = 1 - F.max_pool2d(F.pad(1 - eroded, (1, 1, 1, 1), value=1.0), 3, stride=1)
    return (m - eroded)[0, 0].numpy() > 0


def _oracle_iou(gt: np.ndarray, dt: np.ndarray) -> float:
    d = max(1, int(round(0.02 * math.hypot(H, W))))
    mask_iou = (gt & dt).sum() / (gt | dt).sum()
    bg, bd = _boundary(gt, d), _boundary(dt, d)
    return min(mask_iou, (bg & bd).sum() / (bg | bd).sum())


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _box(y0, x0, y1, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _gt(mask: np.ndarray) -> dict:
    return {
        "images": [{"id": 1, "height": H, "width": W}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": _rle(mask),
                "area": float(mask.sum()),
                "bbox": list(mask_util.toBbox(_rle(mask))),
                "iscrowd": 0,
            }
        ],
    }


def test_boundary_iou_matches_an_independent_computation():
    """Boundary AP at IoU threshold t counts the detection iff min(mask IoU, boundary IoU) ≥ t:
    sweep detections around the oracle IoU and read which thresholds they pass."""
    gt = _box(10, 12, 50, 70)
    shapes = [
        _box(12, 12, 50, 70),
        _box(10, 15, 47, 70),
        _box(14, 16, 46, 66),
        _box(10, 12, 50, 60),
    ]
    thresholds = np.linspace(0.5, 0.95, 10)
    for dt in shapes:
        iou = _oracle_iou(gt, dt)
        result = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": _rle(dt)}]
        ap = evaluate_coco(_gt(gt), result, ("boundary",))["boundary"]["AP"] / 100
        # one GT, one detection: AP averages 1 over the thresholds ≤ IoU, 0 above
        expected = float(np.mean(thresholds <= iou + 1e-9))
        assert ap == pytest.approx(expected, abs=1e-6), (iou, ap)
    # boundary AP is stricter than mask AP when only the boundary is off
    dt = _box(12, 12, 50, 70)
    result = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": _rle(dt)}]
    metrics = evaluate_coco(_gt(gt), result, ("segm", "boundary"))
    assert metrics["boundary"]["AP"] < metrics["segm"]["AP"]


def test_boundary_needs_masks_and_the_faster_backend():
    gt = _box(10, 12, 50, 70)
    with pytest.raises(EvaluationError, match="missing key"):
        evaluate_coco(
            _gt(gt),
            [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [0, 0, 1, 1]}],
            ("boundary",),
        )
    result = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": _rle(gt)}]
    with pytest.raises(EvaluationError, match="faster-coco-eval"):
        evaluate_coco(_gt(gt), result, ("boundary",), backend="pycocotools")
