"""COCO bbox / segm evaluation.

Turns :class:`~dynaseg.structures.instances.Instances` predictions into COCO
result dicts and scores them against a COCO ground-truth file with either
``faster_coco_eval`` (default, C++ matching) or the reference ``pycocotools``.
Both backends produce the same numbers; metrics are returned ×100.

Typical use::

    cmap = CategoryMap.from_coco_json("val.json")
    results = []
    for image_id, dets in predictions:
        results += instances_to_coco_results(dets, image_id, cmap)
    metrics = evaluate_coco("val.json", results)
    print(format_metrics_table(metrics))
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycocotools.mask as mask_utils
import torch

from dynaseg.evaluation import lvis
from dynaseg.evaluation.inputs import (
    EvaluationError,
    load_ground_truth,
    load_json,
    load_results,
    validate_results,
)
from dynaseg.structures.instances import Instances

__all__ = [
    "CategoryMap",
    "EvaluationError",
    "encode_masks",
    "STAT_NAMES",
    "evaluate_coco",
    "format_metrics_table",
    "format_per_class_table",
    "instances_to_coco_results",
]

#: The six headline numbers, in COCOeval ``stats`` order.
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# boundary: Boundary AP (Cheng et al. 2021), IoU = min(mask IoU, boundary IoU) with boundaries of
# width 2 % of the image diagonal; faster-coco-eval computes it (pycocotools has no boundary type).
_IOU_TYPES = ("bbox", "segm", "boundary")
BOUNDARY_DILATION_RATIO = 0.02
_BACKENDS = ("faster", "pycocotools")


# --------------------------------------------------------------------------- categories
class CategoryMap:
    """Bijection between contiguous class ids ``0..C-1`` and COCO category ids.

    Contiguous ids follow the order of ascending COCO category id.
    """

    def __init__(
        self,
        category_ids: Sequence[int],
        names: Sequence[str],
        supercategories: Sequence[str] | None = None,
    ) -> None:
        if len(category_ids) != len(names):
            raise ValueError(f"CategoryMap: {len(category_ids)} ids but {len(names)} names")
        if len(set(category_ids)) != len(category_ids):
            raise ValueError(f"CategoryMap: duplicate category ids in {list(category_ids)}")
        self.category_ids: list[int] = [int(c) for c in category_ids]
        self.names: list[str] = [str(n) for n in names]
        # COCO's optional "supercategory" of each class ("" where the file has none)
        self.supercategories: list[str] = (
            [str(s) for s in supercategories] if supercategories else [""] * len(names)
        )
        self._to_contig = {c: i for i, c in enumerate(self.category_ids)}

    @classmethod
    def from_coco_json(cls, path_or_dict: str | Path | Mapping[str, Any]) -> CategoryMap:
        """Build from a COCO annotation file (or its loaded dict), sorted by category id."""
        name = "<gt dict>"
        if not isinstance(path_or_dict, Mapping):
            name = str(path_or_dict)
            path_or_dict = load_json(path_or_dict, "annotation file")
        cats = path_or_dict.get("categories")
        if not isinstance(cats, list) or not cats:
            raise EvaluationError(f"{name}: no 'categories' list")
        cats = sorted(cats, key=lambda c: int(c["id"]))
        return cls(
            [c["id"] for c in cats],
            [c.get("name", str(c["id"])) for c in cats],
            [c.get("supercategory") or "" for c in cats],
        )

    def __len__(self) -> int:
        return len(self.category_ids)

    def __repr__(self) -> str:
        pairs = ", ".join(
            f"{i}->{c}:{n}" for i, (c, n) in enumerate(zip(self.category_ids[:5], self.names[:5]))
        )
        more = ", ..." if len(self) > 5 else ""
        return f"CategoryMap({len(self)} classes: {pairs}{more})"

    def to_category_id(self, contig: int) -> int:
        """Contiguous id -> COCO category id."""
        if not 0 <= int(contig) < len(self):
            raise KeyError(f"contiguous id {contig} out of range [0, {len(self)})")
        return self.category_ids[int(contig)]

    def to_contiguous(self, cat_id: int) -> int:
        """COCO category id -> contiguous id."""
        try:
            return self._to_contig[int(cat_id)]
        except KeyError:
            raise KeyError(
                f"unknown COCO category id {cat_id}; known: {self.category_ids}"
            ) from None

    def name_of(self, contig: int) -> str:
        """Class name of a contiguous id."""
        self.to_category_id(contig)  # range check
        return self.names[int(contig)]


# --------------------------------------------------------------------------- results
def instances_to_coco_results(
    instances: Instances, image_id: int, category_map: CategoryMap | None = None
) -> list[dict]:
    """Convert one image's predictions to COCO result dicts.

    Args:
        instances: predictions at the *original* image resolution; ``boxes`` (N, 4)
            XYXY px, ``labels`` (N,), ``scores`` (N,) (missing -> 1.0), optional
            ``masks`` (N, H, W) bool.
        image_id: COCO image id.
        category_map: maps labels to COCO category ids; ``None`` uses the label itself.

    Returns:
        N dicts ``{image_id, category_id, bbox [x, y, w, h], score[, segmentation]}``;
        ``segmentation`` is compressed RLE with ``counts`` as ``str``.
    """
    n = len(instances)
    if n == 0:
        return []
    boxes = instances.boxes.detach().to("cpu", torch.float64).numpy()
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
    labels = instances.labels.detach().cpu().numpy().astype(np.int64)
    scores = (
        np.ones(n)
        if instances.scores is None
        else instances.scores.detach().to("cpu", torch.float64).numpy().round(6)
    )
    cat_ids = _labels_to_category_ids(labels, category_map)
    rles = encode_masks(instances.masks) if instances.masks is not None else None

    results = []
    for i, (box, cat, score) in enumerate(zip(xywh.tolist(), cat_ids, scores.tolist())):
        r = {"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score}
        if rles is not None:
            r["segmentation"] = rles[i]
        results.append(r)
    return results


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """Encode (N, H, W) binary masks to compressed RLE dicts (``counts`` as str) in one call."""
    if isinstance(masks, torch.Tensor):
        # (N, W, H) C-contiguous == (H, W, N) Fortran-contiguous; transpose on the mask's device.
        m = masks.detach().to(torch.bool).transpose(1, 2).contiguous().cpu().numpy()
    else:
        m = np.ascontiguousarray(np.asarray(masks, dtype=bool).transpose(0, 2, 1))
    if m.shape[0] == 0:
        return []
    fortran = m.view(np.uint8).transpose(2, 1, 0)
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _labels_to_category_ids(labels: np.ndarray, category_map: CategoryMap | None) -> list[int]:
    if category_map is None:
        return labels.tolist()
    table = np.asarray(category_map.category_ids, dtype=np.int64)
    bad = (labels < 0) | (labels >= len(table))
    if bad.any():
        raise ValueError(f"label {int(labels[bad][0])} out of range for {len(table)} categories")
    return table[labels].tolist()


# --------------------------------------------------------------------------- backends
def _run_faster(
    gt: dict,
    dets: list[dict],
    iou_type: str,
    image_ids: list[int] | None,
    verbose: bool,
    lvis_style: bool,
    use_cats: bool,
) -> tuple[np.ndarray, Any]:
    from faster_coco_eval import COCO, COCOeval_faster

    log = print if verbose else _silent
    coco_gt = COCO(gt, print_function=log)
    coco_dt = coco_gt.loadRes(dets)
    ev = COCOeval_faster(
        coco_gt,
        coco_dt,
        iou_type,
        print_function=log,
        lvis_style=lvis_style,
        boundary_dilation_ratio=BOUNDARY_DILATION_RATIO,
    )
    if lvis_style:
        ev.params.maxDets = [lvis.MAX_DETECTIONS]
    return _evaluate(ev, image_ids, verbose, use_cats)


def _run_pycocotools(
    gt: dict,
    dets: list[dict],
    iou_type: str,
    image_ids: list[int] | None,
    verbose: bool,
    lvis_style: bool,
    use_cats: bool,
) -> tuple[np.ndarray, Any]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(dets)
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    return _evaluate(ev, image_ids, verbose, use_cats)


def _evaluate(
    ev: Any, image_ids: list[int] | None, verbose: bool, use_cats: bool
) -> tuple[np.ndarray, Any]:
    if image_ids is not None:
        ev.params.imgIds = sorted(image_ids)
    ev.params.useCats = int(use_cats)  # 0: one pool, a detection may match an object of any class
    ev.evaluate()
    ev.accumulate()
    if verbose:
        ev.summarize()
    return np.asarray(ev.eval["precision"]), ev.params


def _silent(*_args: Any, **_kwargs: Any) -> None:
    return None


# --------------------------------------------------------------------------- metrics
def _mean_valid(x: np.ndarray) -> float:
    valid = x[x > -1]
    return float(valid.mean()) * 100.0 if valid.size else math.nan


def _stats_from_precision(precision: np.ndarray, params: Any) -> dict[str, float]:
    """The six COCO AP numbers (×100) from precision [T, R, K, A, M] at the largest maxDets
    (COCO 100, LVIS 300); NaN where no GT."""
    iou_thrs = np.asarray(params.iouThrs)
    m = len(params.maxDets) - 1
    area = {lbl: i for i, lbl in enumerate(params.areaRngLbl)}
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    return {
        "AP": _mean_valid(precision[:, :, :, area["all"], m]),
        "AP50": _mean_valid(precision[t50, :, :, area["all"], m]),
        "AP75": _mean_valid(precision[t75, :, :, area["all"], m]),
        "APs": _mean_valid(precision[:, :, :, area["small"], m]),
        "APm": _mean_valid(precision[:, :, :, area["medium"], m]),
        "APl": _mean_valid(precision[:, :, :, area["large"], m]),
    }


def _frequency_stats(
    precision: np.ndarray, params: Any, frequencies: dict[int, str]
) -> dict[str, float]:
    """LVIS's APr, APc, APf (×100): AP over the rare, common and frequent categories."""
    m = len(params.maxDets) - 1
    out = {}
    for label, name in lvis.FREQUENCY_METRICS.items():
        ks = [k for k, c in enumerate(params.catIds) if frequencies[int(c)] == label]
        out[name] = _mean_valid(precision[:, :, ks, 0, m]) if ks else math.nan
    return out


def _per_class(precision: np.ndarray, params: Any, cmap: CategoryMap) -> dict[str, float]:
    m = len(params.maxDets) - 1
    k_of = {int(c): k for k, c in enumerate(params.catIds)}
    return {
        name: _mean_valid(precision[:, :, k_of[cid], 0, m]) if cid in k_of else math.nan
        for cid, name in zip(cmap.category_ids, cmap.names)
    }


def _empty_metrics(
    gt: dict, cmap: CategoryMap, image_ids: list[int] | None, frequencies: dict[int, str] | None
) -> dict:
    keep = None if image_ids is None else set(image_ids)
    with_gt = {
        a["category_id"]
        for a in gt["annotations"]
        if not a.get("iscrowd", 0) and (keep is None or a["image_id"] in keep)
    }
    out: dict[str, Any] = {k: 0.0 for k in STAT_NAMES}
    if frequencies is not None:
        for label, name in lvis.FREQUENCY_METRICS.items():
            group = {c for c, f in frequencies.items() if f == label}
            out[name] = 0.0 if group & with_gt else math.nan
    out["per_class"] = {
        n: (0.0 if c in with_gt else math.nan) for c, n in zip(cmap.category_ids, cmap.names)
    }
    return out


def _prepare_dets(results: list[dict], iou_type: str) -> list[dict]:
    """Per-iou-type shallow copies (loadRes mutates entries).

    For segm and boundary the bbox is dropped so area ranges use the mask area, not the box area.
    """
    drop = "bbox" if iou_type in ("segm", "boundary") else "segmentation"
    return [{k: v for k, v in r.items() if k != drop} for r in results]


def evaluate_coco(
    gt: str | Path | Mapping[str, Any],
    results: Sequence[dict] | str | Path,
    iou_types: Iterable[str] = ("bbox", "segm"),
    *,
    backend: str = "faster",
    image_ids: Iterable[int] | None = None,
    dataset_format: Literal["auto", "coco", "lvis"] = "auto",
    class_agnostic: bool = False,
    verbose: bool = False,
) -> dict[str, dict]:
    """Run COCO evaluation.

    Args:
        gt: COCO annotation file or its loaded dict (never modified).
        results: COCO result dicts, or a JSON file holding them (never modified).
        iou_types: subset of ``("bbox", "segm", "boundary")``; ``segm`` and ``boundary`` (Boundary
            AP, faster-coco-eval only) need ``segmentation`` RLEs.
        backend: ``"faster"`` (faster_coco_eval) or ``"pycocotools"``.
        image_ids: evaluate only these GT images (default: all of them).
        dataset_format: "lvis" evaluates the federated way, "coco" as COCO, "auto" decides by
            the ground truth's content.
        class_agnostic: ignore the categories (``COCOeval``'s ``useCats=0``): a detection may match
            an object of any class, so the drop from this AP to the usual one is what
            classification costs. ``per_class`` is then empty. Not for LVIS.
        verbose: let the backend print its progress and summary tables.

    Returns:
        ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl": float ×100,
        "per_class": {name: AP ×100}}}``. NaN marks a number with no ground truth
        (e.g. APs when there are no small objects); empty results give 0.0. An LVIS ground truth
        (recognised by its content, :mod:`dynaseg.evaluation.lvis`) is evaluated the federated
        way, at 300 detections per image, and adds ``APr``, ``APc`` and ``APf``.

    Raises:
        EvaluationError: (a ``ValueError``) with a one-line message naming the file.
    """
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in _IOU_TYPES:
            raise ValueError(f"unknown iou_type {t!r}; choose from {_IOU_TYPES}")
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {_BACKENDS}")
    if backend == "pycocotools" and "boundary" in iou_types:
        raise EvaluationError(
            "boundary AP needs the faster-coco-eval backend (pycocotools has none)"
        )
    gt_dict, gt_name = load_ground_truth(gt, masks="segm" in iou_types or "boundary" in iou_types)
    dets, res_name = load_results(results)
    validate_results(dets, res_name, gt_dict, gt_name, iou_types)
    cmap = CategoryMap.from_coco_json(gt_dict)
    frequencies = None
    if dataset_format == "lvis" or (dataset_format == "auto" and lvis.is_lvis(gt_dict)):
        lvis.check_lvis_fields(gt_dict, gt_name)
        if class_agnostic:
            raise EvaluationError(
                f"{gt_name} is LVIS: its federated evaluation is per category, "
                "so it has no class-agnostic form"
            )
        if backend == "pycocotools":
            raise EvaluationError(
                f"{gt_name} is LVIS: its federated evaluation needs the faster-coco-eval backend"
            )
        frequencies = lvis.category_frequencies(gt_dict)
        dets = lvis.checked_detections(gt_dict, lvis.top_detections_per_image(dets))
    ids = None if image_ids is None else [int(i) for i in image_ids]
    if ids is not None:
        unknown = sorted(set(ids) - {int(img["id"]) for img in gt_dict["images"]})
        if unknown:
            raise EvaluationError(f"image_ids {unknown[:5]} are not in ground truth {gt_name}")
    run = _run_faster if backend == "faster" else _run_pycocotools

    metrics: dict[str, dict] = {}
    for iou_type in iou_types:
        if not dets:
            metrics[iou_type] = _empty_metrics(gt_dict, cmap, ids, frequencies)
            if class_agnostic:
                metrics[iou_type]["per_class"] = {}
            continue
        stdout = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with stdout:
            precision, params = run(
                gt_dict,
                _prepare_dets(dets, iou_type),
                iou_type,
                ids,
                verbose,
                frequencies is not None,
                not class_agnostic,
            )
        out: dict[str, Any] = _stats_from_precision(precision, params)
        if frequencies is not None:
            out |= _frequency_stats(precision, params, frequencies)
        out["per_class"] = {} if class_agnostic else _per_class(precision, params, cmap)
        metrics[iou_type] = out
    return metrics


# --------------------------------------------------------------------------- tables
def _fmt(v: float, width: int) -> str:
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{v:>{width}.1f}"


def format_metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table: one row per iou type, columns AP AP50 AP75 APs APm APl (one decimal),
    and APr APc APf for LVIS."""
    names = STAT_NAMES + tuple(
        n for n in lvis.FREQUENCY_METRICS.values() if any(n in m for m in metrics.values())
    )
    header = f"{'':<9}" + "".join(f"{s:>7}" for s in names)
    lines = [header, "-" * len(header)]
    for iou_type in [t for t in _IOU_TYPES if t in metrics]:
        row = metrics[iou_type]
        lines.append(f"{iou_type:<9}" + "".join(_fmt(row.get(s, math.nan), 7) for s in names))
    return "\n".join(lines)


def format_per_class_table(
    metrics: Mapping[str, Mapping[str, Any]],
    iou_type: str = "bbox",
    columns: int = 3,
    *,
    groups: Mapping[str, str] | None = None,
) -> str:
    """Plain-text per-class AP table for one iou type, ``columns`` (name, AP) pairs per row.

    groups: class name -> group title (LVIS: rare / common / frequent); one block per group.
    """
    if iou_type not in metrics:
        raise KeyError(f"no {iou_type!r} metrics; have {list(metrics)}")
    items = list(metrics[iou_type]["per_class"].items())
    if not items:
        return f"{iou_type}: no classes"
    width = max(8, max(len(n) for n, _ in items))
    ncol = min(columns, len(items))
    header = "   ".join(f"{'category':<{width}}{'AP':>6}" for _ in range(ncol))
    lines = [f"per-class {iou_type} AP", header, "-" * len(header)]
    blocks: dict[str, list] = {}
    for name, value in items:
        blocks.setdefault(groups.get(name, "") if groups else "", []).append((name, value))
    for title, block in blocks.items():
        if title:
            lines.append(f"[{title}: {len(block)} classes]")
        for i in range(0, len(block), columns):
            lines.append("   ".join(f"{n:<{width}}{_fmt(v, 6)}" for n, v in block[i : i + columns]))
    return "\n".join(lines)
