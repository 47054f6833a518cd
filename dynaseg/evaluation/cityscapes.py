"""Cityscapes instance-level AP and AP50, the official benchmark's definition.

Reimplements the metric of ``cityscapesscripts``' ``evalInstanceLevelSemanticLabeling`` (without
its distance-based variants) on COCO-format files: the ground truth written by
``dynaseg data cityscapes`` (:func:`dynaseg.data.cityscapes.convert_cityscapes`) and COCO results
(``image_id``, ``category_id``, ``score``, ``segmentation`` RLE at full image size).

The definition, for each class and each overlap threshold t in 0.50:0.95:0.05 (the exact floats of
``np.arange(0.5, 1.0, 0.05)``; a match needs IoU > t):

* scored ground truth: instances (``iscrowd: 0``) of at least 100 pixels. Group regions
  (``iscrowd: 1``) and smaller instances are never counted as misses;
* a scored instance matched by one or more predictions of its class is a true positive with the
  highest of their scores; the other matching predictions are false positives; an unmatched one
  is a miss;
* a prediction matching no ground truth of its class (scored, small or group) is a false positive
  unless more than a fraction t of its pixels are "ignored": void pixels (the image's
  ``void_segmentation``) plus its overlap with group regions plus its overlap with small
  instances of its class (a small group region counts twice, as in the official script);
* AP is the area under the precision-recall points (one per distinct score) and the point
  (recall 0, precision 1), by the trapezoidal rule, as the official script's step widths give;
  0 for a class with ground truth but no prediction, NaN for a class without scored ground truth.

AP averages over classes and thresholds (NaN classes left out), AP50 over classes at t = 0.5.
Predictions with an empty mask are dropped, as the official script drops them.

One case differs: a class with ground truth and predictions that are all ignored (no true or false
positive at some threshold) makes the official script fail (an IndexError); here its AP is 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from dynaseg.data.cityscapes import VOID_KEY
from dynaseg.evaluation.inputs import EvaluationError, load_json

__all__ = ["OVERLAPS", "MIN_REGION_SIZE", "is_cityscapes", "evaluate_cityscapes"]

#: The official overlap thresholds (a match needs IoU strictly above one).
OVERLAPS: np.ndarray = np.arange(0.5, 1.0, 0.05)
#: Ground-truth instances smaller than this many pixels are not scored.
MIN_REGION_SIZE = 100


@dataclass
class _Masks:
    """RLEs of one image and one class, with their pixel counts (N,)."""

    rles: list[dict] = field(default_factory=list)
    areas: list[int] = field(default_factory=list)


@dataclass
class _GroundTruth(_Masks):
    is_group: list[bool] = field(default_factory=list)


@dataclass
class _Predictions(_Masks):
    scores: list[float] = field(default_factory=list)


@dataclass
class _Curve:
    """One class at one threshold, over all images: scored detections and missed instances."""

    scores: list[np.ndarray] = field(default_factory=list)
    is_true: list[np.ndarray] = field(default_factory=list)
    misses: int = 0


def is_cityscapes(gt: Mapping[str, Any]) -> bool:
    """Whether a ground-truth dict was written by ``dynaseg data cityscapes`` (its images carry
    the void pixels the official metric needs)."""
    images = gt.get("images") or []
    return bool(images) and isinstance(images[0], Mapping) and VOID_KEY in images[0]


def evaluate_cityscapes(
    gt: str | Path | Mapping[str, Any], results: Sequence[dict] | str | Path
) -> dict[str, Any]:
    """Official Cityscapes instance-level AP and AP50 (see the module docstring).

    Works one image at a time on RLEs, so memory stays bounded by one image's masks.

    Args:
        gt: ``instances_<split>.json`` from ``dynaseg data cityscapes``, or its loaded dict; each
            image entry needs its ``void_segmentation`` RLE.
        results: COCO result dicts, or a JSON file holding them.

    Returns:
        ``{"AP": float, "AP50": float, "per_class": {name: {"AP": float, "AP50": float}}}``, ×100;
        NaN where a class (or every class) has no scored ground truth.

    Raises:
        EvaluationError: malformed ground truth or results, with a one-line message.
    """
    gt_dict, gt_name = _load(gt, "ground-truth file", Mapping, default_name="<gt dict>")
    dets, res_name = _load(results, "results file", list, default_name="<results list>")
    images, categories = _check_gt(gt_dict, gt_name)
    _check_results(dets, res_name, images, categories)
    class_index = {cid: k for k, cid in enumerate(categories)}
    curves = [[_Curve() for _ in OVERLAPS] for _ in categories]
    has_gt = np.zeros(len(categories), bool)
    has_pred = np.zeros(len(categories), bool)
    gt_per_image = _group_by_image(gt_dict["annotations"])
    dets_per_image = _group_by_image(dets)
    for image_id, image in images.items():
        gts = _image_ground_truth(gt_per_image.get(image_id, []), image, class_index)
        preds = _image_predictions(dets_per_image.get(image_id, []), image, class_index)
        void = _rle(image[VOID_KEY], image)
        for k in range(len(categories)):
            scored = _scored(gts[k])
            has_gt[k] |= bool(scored.any())
            has_pred[k] |= bool(preds[k].rles)
            _match_image(gts[k], preds[k], void, curves[k])
    ap = np.full((len(categories), len(OVERLAPS)), math.nan)
    for k in np.flatnonzero(has_gt):
        ap[k] = [_average_precision(c) if has_pred[k] else 0.0 for c in curves[k]]
    return _summary(ap * 100.0, list(categories.values()))


# --------------------------------------------------------------------------- matching
def _scored(gts: _GroundTruth) -> np.ndarray:
    """(G,) bool: the instances that count (not a group region, at least MIN_REGION_SIZE px)."""
    return ~np.asarray(gts.is_group, bool) & (np.asarray(gts.areas) >= MIN_REGION_SIZE)


def _intersections(preds: list[dict], others: list[dict], pred_areas: np.ndarray) -> np.ndarray:
    """(P, G) int64 pixel counts of each prediction ∩ each other mask.

    pycocotools' crowd IoU is intersection / prediction area; times the area it gives back the
    (integer) intersection exactly once rounded.
    """
    if not preds or not others:
        return np.zeros((len(preds), len(others)), np.int64)
    over_pred = np.asarray(mask_utils.iou(preds, others, [1] * len(others)), np.float64)
    return np.rint(over_pred * pred_areas[:, None]).astype(np.int64)


def _match_image(gts: _GroundTruth, preds: _Predictions, void: dict, curves: list[_Curve]) -> None:
    """Add one image's true positives, false positives and misses of one class to ``curves``."""
    if not gts.rles and not preds.rles:
        return
    gt_areas = np.asarray(gts.areas, np.int64)  # (G,)
    is_group = np.asarray(gts.is_group, bool)  # (G,)
    scored = _scored(gts)  # (G,)
    pred_areas = np.asarray(preds.areas, np.int64)  # (P,)
    scores = np.asarray(preds.scores, np.float64)  # (P,)
    inter = _intersections(preds.rles, gts.rles, pred_areas)  # (P, G)
    iou = inter / (gt_areas[None, :] + pred_areas[:, None] - inter)  # (P, G)
    void_inter = _intersections(preds.rles, [void], pred_areas)[:, 0]  # (P,)
    ignored = (  # (P,) pixels that cannot make a false positive
        void_inter
        + inter[:, is_group].sum(axis=1)
        + inter[:, gt_areas < MIN_REGION_SIZE].sum(axis=1)
    )
    for threshold, curve in zip(OVERLAPS, curves):
        hits = iou > threshold  # (P, G)
        for g in np.flatnonzero(scored):
            matched = scores[hits[:, g]]
            if not matched.size:
                curve.misses += 1
                continue
            curve.scores.append(matched)  # the best is the true positive, the rest duplicates
            curve.is_true.append(np.arange(matched.size) == np.argmax(matched))
        unmatched = ~hits.any(axis=1)
        false_pos = unmatched & (ignored / pred_areas <= threshold)
        curve.scores.append(scores[false_pos])
        curve.is_true.append(np.zeros(int(false_pos.sum()), bool))


def _average_precision(curve: _Curve) -> float:
    """Area under the precision-recall points (one per distinct score) and (recall 0,
    precision 1), trapezoidal, in [0, 1]."""
    scores = np.concatenate(curve.scores) if curve.scores else np.zeros(0)
    is_true = np.concatenate(curve.is_true) if curve.is_true else np.zeros(0, bool)
    if not scores.size:
        return 0.0  # every prediction ignored (the official script fails here)
    order = np.argsort(-scores, kind="stable")
    scores, is_true = scores[order], is_true[order]
    last_of_score = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    true_pos = np.cumsum(is_true)[last_of_score]  # at each distinct score, high to low
    precision = true_pos / (last_of_score + 1)
    recall = true_pos / (int(is_true.sum()) + curve.misses)
    # from the lowest score (highest recall) to the artificial point (recall 0, precision 1)
    recall = np.r_[recall[::-1], 0.0]
    precision = np.r_[precision[::-1], 1.0]
    return float(np.sum((recall[:-1] - recall[1:]) * (precision[:-1] + precision[1:]) / 2))


def _summary(ap: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Averages of ap (K classes, T thresholds) ×100; NaN rows are classes without ground truth."""
    valid = ~np.isnan(ap[:, 0])
    return {
        "AP": float(ap[valid].mean()) if valid.any() else math.nan,
        "AP50": float(ap[valid, 0].mean()) if valid.any() else math.nan,
        "per_class": {
            name: {"AP": float(row.mean()), "AP50": float(row[0])} for name, row in zip(names, ap)
        },
    }


# --------------------------------------------------------------------------- per image inputs
def _group_by_image(entries: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    grouped: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for e in entries:
        grouped[int(e["image_id"])].append(e)
    return grouped


def _rle(segmentation: Any, image: Mapping[str, Any]) -> dict:
    """A compressed RLE of the image's size from an RLE (str or list counts) or polygons."""
    h, w = int(image["height"]), int(image["width"])
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, h, w)
    return segmentation


def _image_ground_truth(
    anns: list[Mapping[str, Any]], image: Mapping[str, Any], class_index: dict[int, int]
) -> list[_GroundTruth]:
    gts = [_GroundTruth() for _ in class_index]
    for a in anns:
        gt = gts[class_index[int(a["category_id"])]]
        rle = _rle(a["segmentation"], image)
        gt.rles.append(rle)
        gt.areas.append(int(mask_utils.area(rle)))
        gt.is_group.append(bool(a.get("iscrowd", 0)))
    return gts


def _image_predictions(
    dets: list[Mapping[str, Any]], image: Mapping[str, Any], class_index: dict[int, int]
) -> list[_Predictions]:
    preds = [_Predictions() for _ in class_index]
    for d in dets:
        rle = _rle(d["segmentation"], image)
        area = int(mask_utils.area(rle))
        if area == 0:
            continue
        p = preds[class_index[int(d["category_id"])]]
        p.rles.append(rle)
        p.areas.append(area)
        p.scores.append(float(d["score"]))
    return preds


# --------------------------------------------------------------------------- loading / checks
def _load(source: Any, what: str, kind: type, *, default_name: str) -> tuple[Any, str]:
    """The JSON data of a file (or the object itself) and a name for messages."""
    if not isinstance(source, (str, Path)):
        data, name = source, default_name
    else:
        name, data = str(source), load_json(source, what)
    if not isinstance(data, kind):
        raise EvaluationError(f"{name}: expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data, name


def _check_gt(gt: Mapping[str, Any], name: str) -> tuple[dict[int, dict], dict[int, str]]:
    """Images by id and category names by id (ascending), or EvaluationError."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"ground truth {name}: missing '{key}' list")
    categories = {
        int(c["id"]): str(c.get("name", c["id"])) for c in sorted(gt["categories"], key=_id)
    }
    images = {int(im["id"]): im for im in gt["images"]}
    for image_id, im in images.items():
        missing = [k for k in ("height", "width", VOID_KEY) if k not in im]
        if missing:
            raise EvaluationError(
                f"ground truth {name}: image {image_id} has no {missing} (the official metric "
                f"needs the void pixels, '{VOID_KEY}'); write the file with `dynaseg data cityscapes`"
            )
    for k, a in enumerate(gt["annotations"]):
        if a.get("image_id") not in images or a.get("category_id") not in categories:
            raise EvaluationError(
                f"ground truth {name}: annotations[{k}] has an unknown image_id or category_id"
            )
        if "segmentation" not in a:
            raise EvaluationError(f"ground truth {name}: annotations[{k}] has no 'segmentation'")
    return images, categories


def _id(entry: Mapping[str, Any]) -> int:
    return int(entry["id"])


def _check_results(
    dets: list, name: str, images: dict[int, dict], categories: dict[int, str]
) -> None:
    for i, d in enumerate(dets):
        where = f"results {name}: entry {i}"
        if not isinstance(d, Mapping):
            raise EvaluationError(f"{where} is a {type(d).__name__}, expected an object")
        missing = [k for k in ("image_id", "category_id", "score", "segmentation") if k not in d]
        if missing:
            raise EvaluationError(f"{where} is missing key(s) {missing}")
        if d["image_id"] not in images:
            raise EvaluationError(f"{where} has image_id {d['image_id']!r}, not in ground truth")
        if d["category_id"] not in categories:
            raise EvaluationError(
                f"{where} has unknown category_id {d['category_id']!r} "
                f"(ground truth has {sorted(categories)})"
            )
        if not isinstance(d["score"], Real) or not math.isfinite(d["score"]):
            raise EvaluationError(f"{where} has score {d['score']!r}, expected a finite number")
        seg, image = d["segmentation"], images[d["image_id"]]
        if not isinstance(seg, Mapping) or "counts" not in seg or "size" not in seg:
            raise EvaluationError(f"{where}: segmentation must be an RLE with 'size' and 'counts'")
        if [int(s) for s in seg["size"]] != [int(image["height"]), int(image["width"])]:
            raise EvaluationError(
                f"{where}: mask size {list(seg['size'])} != image size "
                f"[{image['height']}, {image['width']}]"
            )
