"""Reading evaluation inputs: the error every input check raises, the JSON reader, and the checks
of COCO-style ground truth and results (a one-line :class:`EvaluationError` naming the file and the
entry, before any backend reads them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dynaseg.data.coco import MAX_IMAGE_PIXELS
from dynaseg.data.rle_strings import rle_string_counts, rle_strings_cover
from dynaseg.errors import UserError
from dynaseg.utils.json_files import JSONFileError, read_json

__all__ = [
    "EvaluationError",
    "load_json",
    "load_ground_truth",
    "load_results",
    "validate_results",
]


class EvaluationError(UserError, ValueError):
    """Bad ground truth or results given to an evaluation; the message names the file."""


def load_json(
    path: str | Path, what: str, *, error: type[EvaluationError] = EvaluationError
) -> Any:
    """The data of a JSON file, or ``error`` naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} '{p}' does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        return read_json(p)
    except JSONFileError as e:
        raise error(f"{what} '{p}': {e}") from None
    except OSError as e:
        raise error(f"{what} '{p}': cannot read it ({e.strerror or e})") from None


# --------------------------------------------------------------------------- COCO-style files
def load_ground_truth(gt: str | Path | Mapping[str, Any], *, masks: bool) -> tuple[dict, str]:
    """Checked private copy of the GT dict (backends may mutate its annotations) and its name; ``masks``:
    its segmentations will be evaluated (and so are checked)."""
    name = "<gt dict>"
    if not isinstance(gt, Mapping):
        name = str(gt)
        gt = load_json(gt, "ground-truth file")
    if not isinstance(gt, Mapping):
        raise EvaluationError(
            f"ground truth {name}: expected a JSON object, got {type(gt).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"ground truth {name}: missing '{key}' list")
    _validate_gt(gt, name, masks=masks)
    anns = []
    for a in gt["annotations"]:
        a = dict(a)  # backends write 'ignore', RLEs, ... into annotation dicts
        a.setdefault("iscrowd", 0)
        if "area" not in a and "bbox" in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        anns.append(a)
    out = {k: v for k, v in gt.items() if k != "annotations"}
    out["annotations"] = anns
    return out, name


def _validate_gt(gt: Mapping[str, Any], name: str, *, masks: bool) -> None:
    """Raise :class:`EvaluationError` on the first malformed entry: ids that are not integers or
    used twice, non-positive image sizes, unknown image or category ids, ``iscrowd`` not 0/1,
    boxes or areas that are not finite numbers and, with ``masks``, segmentations that are neither
    polygons nor an RLE of the image's size (ground truth is never cleaned: that would change the
    AP)."""
    where = f"ground truth {name}"
    sizes = {}
    for k, img in enumerate(gt["images"]):
        if not isinstance(img, Mapping) or not _is_int(img.get("id")):
            raise EvaluationError(f"{where}: images[{k}] needs an integer 'id'")
        h, w = img.get("height"), img.get("width")
        if not (_is_int(h) and _is_int(w) and 0 < h * w <= MAX_IMAGE_PIXELS and h > 0):
            raise EvaluationError(
                f"{where}: image id {img['id']} needs positive integer 'height' and 'width' of "
                f"at most {MAX_IMAGE_PIXELS} pixels together, got {_short(h)} x {_short(w)}"
            )
        if img["id"] in sizes:
            raise EvaluationError(f"{where}: image id {img['id']} is used twice")
        sizes[img["id"]] = (h, w)
    cat_ids = set()
    for k, cat in enumerate(gt["categories"]):
        if not isinstance(cat, Mapping) or not _is_int(cat.get("id")):
            raise EvaluationError(f"{where}: categories[{k}] needs an integer 'id'")
        if cat["id"] in cat_ids:
            raise EvaluationError(f"{where}: category id {cat['id']} is used twice")
        cat_ids.add(cat["id"])
    ann_ids = set()
    for k, a in enumerate(gt["annotations"]):
        at = f"{where}: annotations[{k}]"
        if not isinstance(a, Mapping):
            raise EvaluationError(f"{at} is a {type(a).__name__}, expected an object")
        if not _is_int(a.get("id")) or a["id"] in ann_ids:
            raise EvaluationError(
                f"{at} needs an integer 'id' used once, got {_short(a.get('id'))}"
            )
        ann_ids.add(a["id"])
        if not _is_int(a.get("image_id")) or a["image_id"] not in sizes:
            raise EvaluationError(f"{at} has image_id {_short(a.get('image_id'))} not in 'images'")
        if not _is_int(a.get("category_id")) or a["category_id"] not in cat_ids:
            raise EvaluationError(f"{at} has unknown category_id {_short(a.get('category_id'))}")
        if a.get("iscrowd", 0) not in (0, 1):
            raise EvaluationError(f"{at}: 'iscrowd' must be 0 or 1, got {_short(a['iscrowd'])}")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_finite_number, bbox))):
            raise EvaluationError(f"{at}: 'bbox' must be 4 finite numbers, got {_short(bbox)}")
        if "area" in a and not _is_finite_number(a["area"]):
            raise EvaluationError(f"{at}: 'area' must be a finite number, got {_short(a['area'])}")
        if masks:
            _check_segmentation(a.get("segmentation"), sizes[a["image_id"]], at)


def load_results(results: Sequence[dict] | str | Path) -> tuple[list, str]:
    if isinstance(results, (str, Path)):
        name = str(results)
        data = load_json(results, "results file")
    else:
        name, data = "<results list>", results
    if not isinstance(data, list):
        raise EvaluationError(
            f"results {_q(name)}: expected a JSON list of detections, got {type(data).__name__}"
        )
    return data, name


def _q(name: str) -> str:
    return name if name.startswith("<") else f"file '{name}'"


def validate_results(
    results: list, name: str, gt: dict, gt_name: str, iou_types: Sequence[str]
) -> None:
    """Raise :class:`EvaluationError` on the first malformed entry (one line, names the file)."""
    required = ["image_id", "category_id", "score"]
    if "bbox" in iou_types:
        required.append("bbox")
    if "segm" in iou_types or "boundary" in iou_types:
        required.append("segmentation")
    sizes = {int(img["id"]): (int(img["height"]), int(img["width"])) for img in gt["images"]}
    cat_ids = {int(c["id"]) for c in gt["categories"]}
    where = f"results {_q(name)}"
    strings: list[tuple[str, int, str]] = []  # compressed RLEs, checked together at the end
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise EvaluationError(f"{where}: entry {i} is a {type(r).__name__}, expected an object")
        missing = [k for k in required if k not in r]
        if missing:
            hint = (
                " (iou_types includes 'segm' but results carry no masks; use iou_types=('bbox',))"
                if missing == ["segmentation"]
                else ""
            )
            raise EvaluationError(f"{where}: entry {i} is missing key(s) {missing}{hint}")
        if not _is_int(r["image_id"]) or r["image_id"] not in sizes:
            raise EvaluationError(
                f"{where}: entry {i} has image_id {_short(r['image_id'])} "
                f"which is not in ground truth {gt_name}"
            )
        if not _is_int(r["category_id"]) or r["category_id"] not in cat_ids:
            raise EvaluationError(
                f"{where}: entry {i} has unknown category_id "
                f"{_short(r['category_id'])} (ground truth has {sorted(cat_ids)[:20]})"
            )
        if not _is_finite_number(r["score"]):
            raise EvaluationError(
                f"{where}: entry {i} score must be a finite number, got {_short(r['score'])}"
            )
        if "bbox" in required and not (
            isinstance(r["bbox"], (list, tuple))
            and len(r["bbox"]) == 4
            and all(map(_is_finite_number, r["bbox"]))
        ):
            raise EvaluationError(
                f"{where}: entry {i} bbox must be 4 finite numbers [x, y, w, h], "
                f"got {_short(r['bbox'])}"
            )
        if "segmentation" in required:
            _check_rle(r["segmentation"], sizes[r["image_id"]], f"{where}: entry {i}", strings)
    _check_rle_strings(strings)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite_number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond float range
        return False


def _short(v: Any, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters, for one-line messages."""
    text = (
        repr(v) if not isinstance(v, int) or abs(v) < 10**40 else f"<{v.bit_length()}-bit integer>"
    )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_segmentation(seg: Any, hw: tuple[int, int], where: str) -> None:
    """Ground truth: polygons (lists of >= 3 points of finite numbers) or an RLE."""
    if isinstance(seg, list):
        for part in seg:
            if not (
                isinstance(part, list)
                and len(part) >= 6
                and len(part) % 2 == 0
                and all(map(_is_finite_number, part))
            ):
                raise EvaluationError(
                    f"{where}: polygon parts must be lists of >= 6 finite numbers "
                    f"[x0, y0, x1, y1, ...], got {_short(part)}"
                )
        return
    _check_rle(seg, hw, where)


def _check_rle(seg: Any, hw: tuple[int, int], where: str, strings: list | None = None) -> None:
    """An RLE dict of the image's size whose run lengths cover the image exactly. ``strings``:
    compressed counts are appended there as (counts, h·w, where) for :func:`_check_rle_strings`
    instead of being decoded now."""
    if not isinstance(seg, Mapping) or "counts" not in seg or "size" not in seg:
        raise EvaluationError(f"{where}: segmentation must be an RLE dict with 'size' and 'counts'")
    size = seg["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and tuple(size) == hw):
        raise EvaluationError(
            f"{where}: mask size {_short(size)} != image size {list(hw)} "
            "(masks must be at the original image resolution)"
        )
    counts = seg["counts"]
    if isinstance(counts, str) and strings is not None:
        strings.append((counts, hw[0] * hw[1], where))
        return
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
    elif isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts):
        runs = counts
    else:
        runs = None
    if runs is None or sum(runs) != hw[0] * hw[1]:
        raise EvaluationError(
            f"{where}: RLE counts {_short(counts, 40)} do not decode to run lengths covering "
            f"the {hw[0]}x{hw[1]} image"
        )


def _check_rle_strings(strings: list[tuple[str, int, str]]) -> None:
    """All the collected compressed counts at once; the first bad one named if any."""
    if rle_strings_cover([c for c, _, _ in strings], [t for _, t, _ in strings]):
        return
    for counts, total, where in strings:  # find it (the slow, per-string decoder)
        runs = rle_string_counts(counts)
        if runs is None or sum(runs) != total:
            raise EvaluationError(
                f"{where}: RLE counts {_short(counts, 40)} do not decode to run lengths "
                f"covering the image ({total} pixels)"
            )
