"""Is the detector finding objects but naming them wrong? Per-size classification of found objects.

AP mixes localisation, recall and classification. This report separates the last: for every
ground-truth object, take the detections that overlap it (box IoU > ``iou_threshold``) and ask
whether the best-scored of them has the right class. It also counts other-class duplicates: kept
detections that overlap a better-scored detection of another class (what an overlay shows as
several boxes with mixed labels on one object).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.ops import box_convert, box_iou

__all__ = ["class_report", "format_class_report"]


def _xyxy(boxes: list[list[float]]) -> torch.Tensor:
    return box_convert(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")


def class_report(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
    size_bounds: tuple[float, ...] = (16, 32, 64),
    duplicate_score: float = 0.3,
    duplicate_iou: float = 0.6,
) -> dict[str, Any]:
    """Classification of found objects per size, and the other-class duplicate rate.

    Args:
        gt: COCO instances dict (crowd objects are left out). results: COCO result dicts.
        size_bounds: bucket edges of sqrt(box area) in pixels (original image size).
        duplicate_score, duplicate_iou: detections scored at least this, overlapping more than this.

    Returns:
        ``{"buckets": [{"range": [lo, hi], "objects", "right", "wrong", "missed"}],
        "duplicates": {"score_threshold", "detections", "other_class"}}``: an object is *right* when
        its best-scored overlapping detection has its class, *wrong* when another class scores
        higher, *missed* when nothing overlaps it.
    """
    by_image: dict[int, list[Mapping[str, Any]]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    edges = [0.0, *map(float, size_bounds), math.inf]
    buckets = [
        {"range": [lo, hi], "objects": 0, "right": 0, "wrong": 0, "missed": 0}
        for lo, hi in zip(edges[:-1], edges[1:])
    ]
    for ann in gt["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        side = math.sqrt(max(ann["bbox"][2], 0) * max(ann["bbox"][3], 0))
        bucket = next(b for b in buckets if b["range"][0] <= side < b["range"][1])
        bucket["objects"] += 1
        dets = by_image.get(int(ann["image_id"]), [])
        overlap = (
            box_iou(_xyxy([ann["bbox"]]), _xyxy([d["bbox"] for d in dets]))[0] > iou_threshold
            if dets
            else torch.zeros(0, dtype=torch.bool)
        )
        if not overlap.any():
            bucket["missed"] += 1
            continue
        best = max((d for d, o in zip(dets, overlap.tolist()) if o), key=lambda d: d["score"])
        bucket["right" if best["category_id"] == ann["category_id"] else "wrong"] += 1
    kept = duplicates = 0
    for dets in by_image.values():
        dets = [d for d in dets if d["score"] >= duplicate_score]
        kept += len(dets)
        if len(dets) < 2:
            continue
        boxes = _xyxy([d["bbox"] for d in dets])
        iou = box_iou(boxes, boxes)
        scores = torch.tensor([d["score"] for d in dets])
        labels = torch.tensor([d["category_id"] for d in dets])
        beaten = (
            (iou > duplicate_iou)
            & (scores[None, :] > scores[:, None])
            & (labels[None, :] != labels[:, None])
        )
        duplicates += int(beaten.any(dim=1).sum())
    return {
        "buckets": buckets,
        "duplicates": {
            "score_threshold": duplicate_score,
            "detections": kept,
            "other_class": duplicates,
        },
    }


def format_class_report(report: Mapping[str, Any]) -> str:
    """The report as a text table."""
    lines = ["sqrt(area) px   objects   right   wrong  missed  right %", "-" * 56]
    for b in report["buckets"]:
        lo, hi = b["range"]
        name = f"[{lo:g}, {hi:g})" if math.isfinite(hi) else f">= {lo:g}"
        share = 100 * b["right"] / b["objects"] if b["objects"] else float("nan")
        lines.append(
            f"{name:<14}{b['objects']:>9}{b['right']:>8}{b['wrong']:>8}{b['missed']:>8}{share:>9.1f}"
        )
    d = report["duplicates"]
    lines.append(
        f"detections with score >= {d['score_threshold']:g}: {d['detections']}, of which "
        f"{d['other_class']} overlap a better-scored detection of another class"
    )
    return "\n".join(lines)
