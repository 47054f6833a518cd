"""What an overlay shows a person: of the instances drawn at a score threshold, how many are right?

AP ranks every detection down to a score of 0.05; an overlay draws only those above a threshold.
This check scores what is drawn: a drawn instance is *right* when it matches an object of its own
class (mask IoU ≥ ``iou_threshold``, each object matched once, best-scored instances first, as COCO
matches); an object is *found* when a drawn instance of its class matches it. Instances that match
nothing are duplicates, wrong-class or background; instances that only cover a crowd region are
not counted.

Each object not found is put under the first of three reasons that holds: a drawn instance of
another class matches it (``other_class``: the person sees a wrong name), a result of its own class
matches it below the threshold (``below_threshold``: the score is the problem), or neither
(``no_match``; an undrawn instance of another class may match it). ``below_threshold`` is None when
no result scores below the threshold (``predict``'s results.json holds only what it drew): a low
score and a miss then look alike, and both count as ``no_match``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dynaseg.evaluation.inputs import (
    EvaluationError,
    load_ground_truth,
    load_results,
    validate_results,
)

__all__ = ["drawn_agreement", "format_drawn_agreement"]

# Why an object is (not) found; the last three in the order they are checked.
_FOUND, _OTHER_CLASS, _BELOW_THRESHOLD, _NO_MATCH = range(4)
_REASONS = {_OTHER_CLASS: "other_class", _BELOW_THRESHOLD: "below_threshold", _NO_MATCH: "no_match"}


def _by_file_name(results: list, gt: Mapping[str, Any], name: str) -> list:
    """``predict``'s results number images in folder order and carry ``file_name``: re-key them by
    the ground-truth image of that file name."""
    ids: dict[str, int] = {}
    twice = set()
    for img in gt["images"]:
        key = PurePath(str(img.get("file_name", ""))).name
        if key in ids:
            twice.add(key)
        ids[key] = int(img["id"])
    out = []
    for i, r in enumerate(results):
        if not isinstance(r, Mapping) or "file_name" not in r:
            out.append(r)
            continue
        key = PurePath(str(r["file_name"])).name
        if key in twice:
            raise EvaluationError(
                f"results file '{name}': entry {i} is for '{key}', a name several ground-truth "
                "images share; give image ids instead of file names"
            )
        if key not in ids:
            raise EvaluationError(
                f"results file '{name}': entry {i} is for '{key}', which is not an image of the "
                "ground truth"
            )
        out.append({**r, "image_id": ids[key]})
    return out


def _ground_truth_rles(anns: list[Mapping[str, Any]], h: int, w: int) -> list:
    rles = []
    for a in anns:
        seg = a["segmentation"]
        if isinstance(seg, list):
            rles.append(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))
        elif isinstance(seg.get("counts"), list):
            rles.append(mask_utils.frPyObjects(seg, h, w))
        else:
            rles.append(seg)
    return rles


def _match_image(
    results: list[Mapping[str, Any]],
    objects: list,
    crowd: list,
    h: int,
    w: int,
    *,
    score_threshold: float,
    iou_threshold: float,
) -> tuple[int, int, np.ndarray]:
    """(counted drawn instances, right ones, (len(objects),) reason codes: ``_FOUND``,
    ``_OTHER_CLASS``, ``_BELOW_THRESHOLD`` or ``_NO_MATCH``) of one image."""
    dets = sorted(results, key=lambda r: -float(r["score"]))
    det_rles = [r["segmentation"] for r in dets]
    obj_rles = _ground_truth_rles(objects, h, w)
    iou = (
        np.asarray(mask_utils.iou(det_rles, obj_rles, [0] * len(obj_rles))).reshape(
            len(dets), len(objects)
        )
        if dets and objects
        else np.zeros((len(dets), len(objects)))
    )
    crowd_rles = _ground_truth_rles(crowd, h, w)
    in_crowd = (
        np.asarray(mask_utils.iou(det_rles, crowd_rles, [1] * len(crowd_rles)))
        .reshape(len(dets), len(crowd))
        .max(axis=1)
        >= iou_threshold
        if dets and crowd
        else np.zeros(len(dets), dtype=bool)
    )
    classes = np.array([int(o["category_id"]) for o in objects], dtype=np.int64)
    det_classes = np.array([int(r["category_id"]) for r in dets], dtype=np.int64)
    is_drawn = np.array([float(r["score"]) >= score_threshold for r in dets], dtype=bool)
    taken = np.zeros(len(objects), dtype=bool)
    counted = right = 0
    for i in np.flatnonzero(is_drawn):
        candidates = np.where((classes == det_classes[i]) & ~taken, iou[i], -1.0)
        j = int(candidates.argmax()) if len(objects) else -1
        if j >= 0 and candidates[j] >= iou_threshold:
            taken[j] = True
            counted, right = counted + 1, right + 1
        elif not in_crowd[i]:
            counted += 1
    matches = iou >= iou_threshold  # (D, O)
    same_class = det_classes[:, None] == classes[None, :]
    other_drawn = (matches & ~same_class & is_drawn[:, None]).any(axis=0)
    own_below = (matches & same_class & ~is_drawn[:, None]).any(axis=0)
    reasons = np.select(
        [taken, other_drawn, own_below], [_FOUND, _OTHER_CLASS, _BELOW_THRESHOLD], _NO_MATCH
    )
    return counted, right, reasons


def drawn_agreement(
    gt: str | Path | Mapping[str, Any],
    results: str | Path | Sequence[Mapping[str, Any]],
    *,
    score_threshold: float,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Share of drawn instances that are right, and of objects that are found (see module doc).

    Args:
        gt: COCO instances file or dict with masks. results: COCO results with ``segmentation``;
            entries with ``file_name`` (``dynaseg predict``'s ``results.json``) are matched to the
            ground-truth image of that name. Every ground-truth image counts as drawn.
        score_threshold: instances scoring at least this are drawn.

    Returns:
        ``{"score_threshold", "iou_threshold", "drawn", "right", "objects", "found",
        "right_fraction", "found_fraction", "not_found"}`` (fractions are None when there is
        nothing to divide; ``not_found`` counts the objects not found by reason, module doc).
    """
    gt, gt_name = load_ground_truth(gt, masks=True)
    data, name = load_results(results)
    data = _by_file_name(data, gt, name)
    validate_results(data, name, gt, gt_name, ("segm",))
    by_image: dict[int, list] = {}
    for r in data:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    objects: dict[int, list] = {}
    crowd: dict[int, list] = {}
    for a in gt["annotations"]:
        (crowd if a.get("iscrowd", 0) else objects).setdefault(int(a["image_id"]), []).append(a)
    counted = right = 0
    reasons = np.zeros(len(_REASONS) + 1, dtype=np.int64)
    for img in gt["images"]:
        i = int(img["id"])
        c, r, why = _match_image(
            by_image.get(i, []),
            objects.get(i, []),
            crowd.get(i, []),
            int(img["height"]),
            int(img["width"]),
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
        )
        counted, right = counted + c, right + r
        reasons += np.bincount(why, minlength=len(reasons))
    num_objects = sum(len(v) for v in objects.values())
    found = int(reasons[_FOUND])
    not_found = {key: int(reasons[code]) for code, key in _REASONS.items()}
    if not any(float(r["score"]) < score_threshold for r in data):
        not_found["below_threshold"] = None
    return {
        "score_threshold": score_threshold,
        "iou_threshold": iou_threshold,
        "drawn": counted,
        "right": right,
        "objects": num_objects,
        "found": found,
        "right_fraction": right / counted if counted else None,
        "found_fraction": found / num_objects if num_objects else None,
        "not_found": not_found,
    }


def format_drawn_agreement(report: Mapping[str, Any]) -> str:
    """Three lines: right drawn instances and found objects in percent, and why the others are
    not found."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.0f} %"

    iou = report["iou_threshold"]
    why = report["not_found"]
    threshold = f"{report['score_threshold']:g}"
    if why["below_threshold"] is None:
        below = ""
        neither = (
            f"{why['no_match']} with no match drawn "
            f"(results below {threshold} would tell a low score from a miss)"
        )
    else:
        below = f"{why['below_threshold']} with their class below {threshold}, "
        neither = f"{why['no_match']} neither"
    return (
        f"at score >= {report['score_threshold']:g}: {pct(report['right_fraction'])} of "
        f"{report['drawn']} drawn instances match an object of their class (mask IoU >= {iou:g})\n"
        f"at score >= {report['score_threshold']:g}: {pct(report['found_fraction'])} of "
        f"{report['objects']} objects are found with the right class\n"
        f"objects not found: {why['other_class']} drawn with another class, " + below + neither
    )
