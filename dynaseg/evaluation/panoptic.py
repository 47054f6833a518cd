"""COCO panoptic quality (PQ, SQ, RQ) with the semantics of the COCO panoptic API's ``pq_compute``.

Per image, ground-truth and predicted segment id maps are paired with one ``np.unique`` over
``gt_id * OFFSET + pred_id``. A (gt, pred) pair of the same category is a true positive when
IoU > 0.5, where the union leaves out the predicted pixels that fall on VOID (gt id 0). Unmatched
non-crowd gt segments are false negatives; unmatched predictions are false positives unless more
than half of their pixels lie on VOID plus the crowd region of their own category. Per category
``PQ = Σ IoU / (TP + FP/2 + FN/2)``, ``SQ = Σ IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``; "All",
"Things" and "Stuff" average over the categories with TP + FP + FN > 0 (``N`` of them).

Typical use, in memory (no files)::

    acc = PQAccumulator(categories=gt_json["categories"])
    for gt_ids, gt_segments, pred_ids, pred_segments in images:
        acc.add_image(gt_ids=gt_ids, gt_segments=gt_segments, pred_ids=pred_ids,
                      pred_segments=pred_segments)
    print(format_panoptic_table(acc.result()))

or from COCO panoptic files with :func:`pq_compute`.

Where this is stricter than the API (which would silently go on or crash): a gt PNG id missing
from ``segments_info``, an unknown gt category, duplicated segment or image ids, id 0 listed as a
segment and a group ("Things"/"Stuff") without any valid category (NaN instead of a division by
zero) are reported. Per-class numbers of categories with no gt and no prediction are NaN (the API
writes 0.0 there; both leave them out of the averages).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaseg.evaluation.inputs import EvaluationError, load_json
from dynaseg.structures.panoptic import rgb_to_id

__all__ = [
    "OFFSET",
    "VOID",
    "PanopticEvalError",
    "PQCounts",
    "PQAccumulator",
    "pq_compute",
    "pq_compute_arrays",
    "format_panoptic_table",
]

VOID = 0  # segment id of unlabeled pixels
OFFSET = 256 * 256 * 256  # > every segment id, so gt * OFFSET + pred is a unique pair key
_GROUPS: tuple[tuple[str, bool | None], ...] = (("All", None), ("Things", True), ("Stuff", False))


class PanopticEvalError(EvaluationError):
    """Inconsistent panoptic ground truth or predictions; the message names the file or image."""


@dataclass
class PQCounts:
    """Matching counts of one category: summed IoU of the true positives, TP, FP, FN."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQCounts) -> PQCounts:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


# --------------------------------------------------------------------------- in-memory core
def _as_ids(ids: np.ndarray | torch.Tensor, where: str, what: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise PanopticEvalError(f"{where}: {what} id map must be (H, W), got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise PanopticEvalError(f"{where}: {what} id map must hold integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise PanopticEvalError(f"{where}: {what} segment ids must be in [0, 256³)")
    return ids


def _segments_by_id(
    segments: Sequence[Mapping[str, Any]], where: str, what: str
) -> dict[int, Mapping]:
    out: dict[int, Mapping] = {}
    for i, s in enumerate(segments):
        if not isinstance(s, Mapping) or "id" not in s or "category_id" not in s:
            raise PanopticEvalError(
                f"{where}: {what} segments_info[{i}] needs 'id' and 'category_id'"
            )
        sid = int(s["id"])
        if sid == VOID:
            raise PanopticEvalError(
                f"{where}: {what} segments_info[{i}] has id 0, which is reserved for void"
            )
        if sid in out:
            raise PanopticEvalError(
                f"{where}: {what} segment id {sid} is listed twice in segments_info"
            )
        out[sid] = s
    return out


class PQAccumulator:
    """Accumulates per-category PQ counts image by image; :meth:`result` gives the metrics.

    Args:
        categories: COCO panoptic ``categories`` (``id``, ``name``, ``isthing`` 0/1), in the order
            the per-class results should follow.
    """

    def __init__(self, *, categories: Sequence[Mapping[str, Any]]) -> None:
        self.categories: dict[int, Mapping[str, Any]] = {}
        names: set[str] = set()
        for i, c in enumerate(categories):
            if not isinstance(c, Mapping) or "id" not in c:
                raise PanopticEvalError(f"categories[{i}] needs an 'id'")
            cid, name = int(c["id"]), str(c.get("name", c["id"]))
            if cid in self.categories or name in names:
                raise PanopticEvalError(f"category id {cid} or name {name!r} is listed twice")
            self.categories[cid] = c
            names.add(name)
        self.counts: dict[int, PQCounts] = {cid: PQCounts() for cid in self.categories}
        self.num_images = 0

    def add_image(
        self,
        *,
        gt_ids: np.ndarray | torch.Tensor,
        gt_segments: Sequence[Mapping[str, Any]],
        pred_ids: np.ndarray | torch.Tensor,
        pred_segments: Sequence[Mapping[str, Any]],
        where: str = "image",
    ) -> None:
        """Match one image's segments and add the counts.

        Args:
            gt_ids, pred_ids: (H, W) integer segment ids, 0 = void.
            gt_segments: COCO ``segments_info`` of the ground truth: ``id``, ``category_id``,
                ``iscrowd`` (default 0) and ``area`` in pixels (default: counted in ``gt_ids``; the
                API uses the listed area).
            pred_segments: ``segments_info`` of the prediction (``id``, ``category_id``); their
                areas are always counted in ``pred_ids``.
            where: names the image / files in error messages.

        Raises:
            PanopticEvalError: sizes differ, a pred id is in the map but not listed or listed but
                absent from the map, a gt map id is not listed, or a category is unknown.
        """
        gt = _as_ids(gt_ids, where, "ground-truth")
        pred = _as_ids(pred_ids, where, "prediction")
        if gt.shape != pred.shape:
            raise PanopticEvalError(
                f"{where}: prediction size {pred.shape[1]}x{pred.shape[0]} (WxH) != "
                f"ground-truth size {gt.shape[1]}x{gt.shape[0]}"
            )
        gt_segms = _segments_by_id(gt_segments, where, "ground-truth")
        pred_segms = _segments_by_id(pred_segments, where, "prediction")

        # Areas and sanity checks (the API's own checks, done on the predictions).
        gt_area = {sid: int(s["area"]) if "area" in s else 0 for sid, s in gt_segms.items()}
        ids, counts = np.unique(gt, return_counts=True)
        for sid, n in zip(ids.tolist(), counts.tolist()):
            if sid == VOID:
                continue
            if sid not in gt_segms:
                raise PanopticEvalError(
                    f"{where}: ground-truth PNG has segment id {sid} that is not in its "
                    "segments_info"
                )
            if "area" not in gt_segms[sid]:
                gt_area[sid] = n
        for sid, s in gt_segms.items():
            if int(s["category_id"]) not in self.categories:
                raise PanopticEvalError(
                    f"{where}: ground-truth segment {sid} has unknown category_id "
                    f"{s['category_id']} (categories: {sorted(self.categories)})"
                )
        pred_area: dict[int, int] = {}
        ids, counts = np.unique(pred, return_counts=True)
        for sid, n in zip(ids.tolist(), counts.tolist()):
            if sid == VOID:
                continue
            if sid not in pred_segms:
                raise PanopticEvalError(
                    f"{where}: prediction PNG has segment id {sid} that is not in its segments_info"
                )
            if int(pred_segms[sid]["category_id"]) not in self.categories:
                raise PanopticEvalError(
                    f"{where}: predicted segment {sid} has unknown category_id "
                    f"{pred_segms[sid]['category_id']} (categories: {sorted(self.categories)})"
                )
            pred_area[sid] = n
        missing = sorted(set(pred_segms) - set(pred_area))
        if missing:
            raise PanopticEvalError(
                f"{where}: predicted segment ids {missing[:10]} are in segments_info but not "
                "in the prediction PNG"
            )

        # Pixel counts of every (gt id, pred id) pair, void included.
        keys, inter = np.unique(gt * OFFSET + pred, return_counts=True)
        pairs = {
            (int(k) // OFFSET, int(k) % OFFSET): int(n)
            for k, n in zip(keys.tolist(), inter.tolist())
        }

        gt_cat = {sid: int(s["category_id"]) for sid, s in gt_segms.items()}
        pred_cat = {sid: int(s["category_id"]) for sid, s in pred_segms.items()}
        crowd = {sid for sid, s in gt_segms.items() if int(s.get("iscrowd", 0)) == 1}
        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for (g, p), n in pairs.items():
            if g not in gt_segms or p not in pred_segms or g in crowd or gt_cat[g] != pred_cat[p]:
                continue
            union = pred_area[p] + gt_area[g] - n - pairs.get((VOID, p), 0)
            iou = n / union
            if iou > 0.5:
                c = self.counts[gt_cat[g]]
                c.tp += 1
                c.iou += iou
                gt_matched.add(g)
                pred_matched.add(p)

        crowd_of_category: dict[int, int] = {}
        for g in gt_segms:
            if g in gt_matched:
                continue
            if g in crowd:
                crowd_of_category[gt_cat[g]] = (
                    g  # as in the API: the last crowd segment of a category counts
                )
                continue
            self.counts[gt_cat[g]].fn += 1

        for p in pred_segms:
            if p in pred_matched:
                continue
            ignored = pairs.get((VOID, p), 0)
            if pred_cat[p] in crowd_of_category:
                ignored += pairs.get((crowd_of_category[pred_cat[p]], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self.counts[pred_cat[p]].fp += 1
        self.num_images += 1

    def result(self) -> dict[str, Any]:
        """Metrics ×100: ``{"All"|"Things"|"Stuff": {"PQ", "SQ", "RQ": float, "N": int},
        "per_class": {name: {"PQ", "SQ", "RQ": float, "isthing": bool}}}``.

        Groups without a valid category and classes with no gt and no prediction are NaN.
        """
        per_class: dict[str, dict[str, Any]] = {}
        valid: dict[int, tuple[float, float, float]] = {}
        for cid, cat in self.categories.items():
            c = self.counts[cid]
            isthing = int(cat.get("isthing", 0)) == 1
            if c.tp + c.fp + c.fn == 0:
                pq = sq = rq = math.nan
            else:
                denom = c.tp + 0.5 * c.fp + 0.5 * c.fn
                pq, sq, rq = c.iou / denom, (c.iou / c.tp if c.tp else 0.0), c.tp / denom
                valid[cid] = (pq, sq, rq)
            per_class[str(cat.get("name", cid))] = {
                "PQ": 100.0 * pq,
                "SQ": 100.0 * sq,
                "RQ": 100.0 * rq,
                "isthing": isthing,
            }
        out: dict[str, Any] = {}
        for group, isthing in _GROUPS:
            rows = [
                v
                for cid, v in valid.items()
                if isthing is None or (int(self.categories[cid].get("isthing", 0)) == 1) == isthing
            ]
            n = len(rows)
            mean = [100.0 * sum(r[i] for r in rows) / n if n else math.nan for i in range(3)]
            out[group] = {"PQ": mean[0], "SQ": mean[1], "RQ": mean[2], "N": n}
        out["per_class"] = per_class
        return out


def pq_compute_arrays(
    images: Iterable[
        tuple[
            np.ndarray | torch.Tensor,
            Sequence[Mapping[str, Any]],
            np.ndarray | torch.Tensor,
            Sequence[Mapping[str, Any]],
        ]
    ],
    *,
    categories: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """PQ of in-memory images, each ``(gt_ids (H, W), gt_segments, pred_ids (H, W), pred_segments)``.

    Same result shape as :meth:`PQAccumulator.result`.
    """
    acc = PQAccumulator(categories=categories)
    for i, (gt_ids, gt_segments, pred_ids, pred_segments) in enumerate(images):
        acc.add_image(
            gt_ids=gt_ids,
            gt_segments=gt_segments,
            pred_ids=pred_ids,
            pred_segments=pred_segments,
            where=f"image {i}",
        )
    return acc.result()


# --------------------------------------------------------------------------- files
def _load_panoptic_json(path: str | Path, what: str, *, need_categories: bool) -> dict:
    p = Path(path)
    data = load_json(p, f"{what} file", error=PanopticEvalError)
    if not isinstance(data, Mapping):
        raise PanopticEvalError(
            f"{what} file '{p}': expected a JSON object, got {type(data).__name__}"
        )
    keys = ("annotations", "categories") if need_categories else ("annotations",)
    for key in keys:
        if not isinstance(data.get(key), list):
            raise PanopticEvalError(f"{what} file '{p}': missing '{key}' list")
    for i, a in enumerate(data["annotations"]):
        if not (
            isinstance(a, Mapping)
            and "image_id" in a
            and "file_name" in a
            and isinstance(a.get("segments_info"), list)
        ):
            raise PanopticEvalError(
                f"{what} file '{p}': annotations[{i}] needs 'image_id', 'file_name' and a "
                "'segments_info' list"
            )
    return data


def _read_png_ids(path: Path, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise PanopticEvalError(f"{what} PNG '{path}' does not exist")
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA"):
                raise PanopticEvalError(
                    f"{what} PNG '{path}' is {im.mode}, expected RGB-encoded segment ids"
                )
            rgb = np.asarray(im)
    except (UnidentifiedImageError, OSError) as e:
        raise PanopticEvalError(f"{what} PNG '{path}' cannot be read: {e}") from None
    return rgb_to_id(rgb)


def pq_compute(
    gt_json: str | Path, gt_dir: str | Path, pred_json: str | Path, pred_dir: str | Path
) -> dict[str, Any]:
    """PQ of COCO panoptic prediction files against COCO panoptic ground truth.

    Note the argument order (gt JSON, gt PNG folder, pred JSON, pred PNG folder) differs from the
    API's ``pq_compute(gt_json, pred_json, gt_folder, pred_folder)``.

    Args:
        gt_json: ``annotations`` (``image_id``, ``file_name``, ``segments_info``) and
            ``categories`` (``id``, ``name``, ``isthing``).
        gt_dir: folder of the gt PNGs (``file_name`` of each annotation).
        pred_json: ``annotations`` in the same form; one per gt image (extra images are ignored).
        pred_dir: folder of the predicted PNGs.

    Returns:
        See :meth:`PQAccumulator.result` (numbers ×100).

    Raises:
        PanopticEvalError: (a ``ValueError``) one-line message naming the offending file.
    """
    gt = _load_panoptic_json(gt_json, "ground-truth", need_categories=True)
    pred = _load_panoptic_json(pred_json, "prediction", need_categories=False)
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise PanopticEvalError(f"{what} PNG folder '{folder}' does not exist")
    try:
        acc = PQAccumulator(categories=gt["categories"])
    except PanopticEvalError as e:
        raise PanopticEvalError(f"ground-truth file '{gt_json}': {e}") from None
    pred_by_image: dict[Any, Mapping] = {}
    for a in pred["annotations"]:
        if a["image_id"] in pred_by_image:
            raise PanopticEvalError(
                f"prediction file '{pred_json}': image_id {a['image_id']!r} appears twice"
            )
        pred_by_image[a["image_id"]] = a
    for gt_ann in gt["annotations"]:
        image_id = gt_ann["image_id"]
        if image_id not in pred_by_image:
            raise PanopticEvalError(
                f"prediction file '{pred_json}' has no annotation for image_id {image_id!r} "
                f"of ground truth '{gt_json}'"
            )
        pred_ann = pred_by_image[image_id]
        gt_png, pred_png = gt_dir / gt_ann["file_name"], pred_dir / pred_ann["file_name"]
        acc.add_image(
            gt_ids=_read_png_ids(gt_png, "ground-truth"),
            gt_segments=gt_ann["segments_info"],
            pred_ids=_read_png_ids(pred_png, "prediction"),
            pred_segments=pred_ann["segments_info"],
            where=f"prediction '{pred_json}', image_id {image_id!r} (PNGs: prediction '{pred_png}', "
            f"ground truth '{gt_png}')",
        )
    return acc.result()


# --------------------------------------------------------------------------- table
def _fmt(v: float, width: int) -> str:
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{v:>{width}.1f}"


def format_panoptic_table(metrics: Mapping[str, Any], *, per_class: bool = True) -> str:
    """Plain-text table: All/Things/Stuff rows (PQ SQ RQ N, one decimal), then one row per class."""
    header = f"{'':<10}{'PQ':>7}{'SQ':>7}{'RQ':>7}{'N':>5}"
    lines = [header, "-" * len(header)]
    for group, _ in _GROUPS:
        row = metrics[group]
        lines.append(
            f"{group:<10}"
            + "".join(_fmt(row[k], 7) for k in ("PQ", "SQ", "RQ"))
            + f"{row['N']:>5d}"
        )
    classes = metrics.get("per_class", {}) if per_class else {}
    if classes:
        width = max(10, max(len(n) for n in classes) + 2)
        head = f"{'category':<{width}}{'kind':<7}{'PQ':>7}{'SQ':>7}{'RQ':>7}"
        lines += ["", "per-class PQ", head, "-" * len(head)]
        for name, row in classes.items():
            kind = "thing" if row["isthing"] else "stuff"
            lines.append(
                f"{name:<{width}}{kind:<7}" + "".join(_fmt(row[k], 7) for k in ("PQ", "SQ", "RQ"))
            )
    return "\n".join(lines)
