"""Load and validate a COCO instances JSON into typed, immutable records.

Policy: an *inconsistent* file (unknown category, annotation of an unknown image, duplicated image
id, RLE of the wrong size or whose run lengths do not add up to the image, missing images on disk,
wrong field types, ids beyond 64 bits, images over ``MAX_IMAGE_PIXELS``) raises
:class:`DatasetError` naming the file and the offending entry, and nothing else. *Degenerate*
annotations (NaN/inf or out-of-float-range boxes, zero-area boxes, polygon parts with fewer than 3
points, an odd number of coordinates, NaN/inf coordinates, no area, or lying outside the image or
more than one image size beyond it, empty RLEs) are dropped; boxes reaching outside the image are
clipped. Every drop or fix is counted in :attr:`CocoInstances.stats` and logged as one summary line
per reason on the ``dynaseg.data`` logger, so nothing disappears silently.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pycocotools.mask as mask_util

from dynaseg.data.lvis import is_lvis, lvis_file_name
from dynaseg.data.packed import RecordColumns, pack_records
from dynaseg.data.rle_strings import rle_string_counts
from dynaseg.errors import UserError
from dynaseg.utils.json_files import JSONFileError, read_json

__all__ = [
    "DatasetError",
    "AnnotationRecord",
    "ImageRecord",
    "CocoInstances",
    "load_coco_instances",
    "read_coco_json",
    "STAT_REASONS",
    "MAX_IMAGE_PIXELS",
    "unwrap_worker_message",
]

logger = logging.getLogger("dynaseg.data")

# stats key -> (log level, description); dropped_* are annotations (or polygon parts) removed.
STAT_REASONS: dict[str, tuple[int, str]] = {
    "clipped_bbox": (logging.INFO, "boxes clipped to the image"),
    "dropped_degenerate_bbox": (
        logging.WARNING,
        "annotations dropped: zero-area box after clipping",
    ),
    "dropped_nonfinite_bbox": (
        logging.WARNING,
        "annotations dropped: NaN/inf (or out of float range) box coordinates",
    ),
    "dropped_polygon_parts": (
        logging.WARNING,
        "polygon parts dropped: < 3 points, odd length, NaN/inf, zero area, or "
        "outside the image (or a vertex more than one image size beyond it)",
    ),
    "dropped_no_valid_polygon": (logging.WARNING, "annotations dropped: no valid polygon left"),
    "dropped_empty_rle": (logging.WARNING, "annotations dropped: RLE mask with zero area"),
    "dropped_missing_segmentation": (logging.WARNING, "annotations dropped: no 'segmentation'"),
    "duplicate_annotation_ids": (logging.WARNING, "annotation ids used more than once (kept)"),
}
_MAX_LISTED = 5  # missing files named in an error message
_MAX_ID = 2**63  # ids must fit in int64
# Compressed RLEs of larger masks need run lengths of more than 6 five-bit groups, which pycocotools'
# decoder (32-bit int shifts) reads inconsistently.
MAX_IMAGE_PIXELS = 2**29 - 1


def unwrap_worker_message(type_name: str, message: str) -> tuple[str, str] | None:
    """``(original message, worker traceback)`` when ``message`` is what a DataLoader worker sends
    for an exception of ``type_name`` ("Caught X in DataLoader worker ... Original Traceback ... X: msg");
    None for any other message."""
    if not message.startswith(f"Caught {type_name} ") or "\nOriginal Traceback" not in message:
        return None
    lines = message.rstrip().splitlines()
    for k in range(len(lines) - 1, 0, -1):
        m = re.match(rf"(?:[\w.]+\.)?{type_name}: (.*)", lines[k])
        if m:
            return "\n".join([m.group(1), *lines[k + 1 :]]), "\n".join(lines[:k])
    return None


class DatasetError(UserError, ValueError):
    """A dataset file is missing, malformed or inconsistent; the message names the file.

    Raised in a DataLoader worker, it reaches the main process with its one-line message intact
    (the worker's traceback becomes a note).
    """

    def __init__(self, message: str = "") -> None:
        unwrapped = (
            unwrap_worker_message(type(self).__name__, message)
            if isinstance(message, str)
            else None
        )
        super().__init__(unwrapped[0] if unwrapped else message)
        if unwrapped:
            self.add_note(unwrapped[1])


@dataclass(frozen=True, slots=True)
class AnnotationRecord:
    """One object.

    Attributes:
        category: contiguous class id in [0, num_classes).
        bbox_xyxy: (x0, y0, x1, y1) absolute pixels, clipped to the image, x1 > x0, y1 > y0.
        segmentation: list of polygons ``[[x, y, x, y, ...], ...]`` (only valid parts kept) or an
            RLE dict ``{"size": [h, w], "counts": str | list[int]}`` of the image's size.
        iscrowd: COCO crowd region; not a positive for training.
    """

    category: int
    bbox_xyxy: tuple[float, float, float, float]
    segmentation: list | dict
    iscrowd: bool


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image and its valid annotations (possibly none: a negative example)."""

    image_id: int
    file_name: str  # absolute path
    height: int
    width: int
    annotations: tuple[AnnotationRecord, ...]


@dataclass(frozen=True)
class CocoInstances:
    """A validated dataset.

    Attributes:
        records: one per image, in the JSON's image order: a :class:`PackedRecords` (flat arrays;
            each ``records[i]`` is built on access) or, built by hand, a list.
        category_ids: COCO category id of each contiguous id (sorted ascending).
        class_names: name of each contiguous id.
        stats: counts per reason (see ``STAT_REASONS``) plus ``images``, ``annotations`` (kept),
            ``crowd_annotations`` and ``images_without_annotations``.
    """

    records: Sequence[ImageRecord]
    category_ids: list[int]
    class_names: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    json_path: str = ""  # the annotation file, named in errors raised when reading samples

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def load_coco_instances(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    check_files: bool = True,
    parsed: dict[str, Any] | None = None,
    dataset_format: Literal["auto", "coco", "lvis"] = "auto",
    log: logging.Logger = logger,
) -> CocoInstances:
    """Parse, validate and clean a COCO instances file (or an LVIS v1 one).

    Args:
        json_path: the annotation JSON.
        image_root: directory the images' ``file_name`` are relative to (LVIS: the COCO root,
            see :mod:`dynaseg.data.lvis`).
        check_files: raise if any listed image is missing on disk.
        parsed: ``read_coco_json(json_path)`` if the caller already has it (not modified).
        dataset_format: "lvis" reads images without ``file_name`` from their ``coco_url``;
            "auto" recognises LVIS files by their content.
        log: where the per-reason summary lines go.

    Raises:
        DatasetError: the file is missing, not JSON, or inconsistent (see module docstring).
    """
    json_path, image_root = os.fspath(json_path), os.fspath(image_root)
    data = parsed if parsed is not None else read_coco_json(json_path)
    lvis = dataset_format == "lvis" or (dataset_format == "auto" and is_lvis(data))
    category_ids, class_names = _parse_categories(data["categories"], json_path)
    images = _parse_images(data["images"], json_path, image_root, lvis=lvis)
    stats: Counter[str] = Counter({k: 0 for k in STAT_REASONS})
    columns = _parse_annotations(
        data["annotations"], json_path, images, {c: i for i, c in enumerate(category_ids)}, stats
    )
    del data  # the parsed JSON is the bulk of the memory: let it go before packing
    if check_files:
        _check_files(json_path, image_root, [im["file_name"] for im in images.values()])
    records = pack_records(images, columns, stats)
    stats["images"] = len(records)
    stats["annotations"] = len(records.categories)
    stats["crowd_annotations"] = int(records.iscrowd.sum())
    stats["images_without_annotations"] = int((np.diff(records.ann_offsets) == 0).sum())
    _log_stats(log, json_path, stats)
    return CocoInstances(
        records=records,
        category_ids=category_ids,
        class_names=class_names,
        stats=dict(stats),
        json_path=json_path,
    )


# ----------------------------------------------------------------------------- file level


def read_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """A COCO-style JSON file as a dict with ``images``, ``annotations`` and ``categories``."""
    path = os.fspath(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, expected a COCO JSON file") from None
    except JSONFileError as e:
        raise DatasetError(f"{path}: {e}") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation file ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(
            f"{path}: missing top-level key(s) {missing}; a COCO instances file "
            f"needs 'images', 'annotations' and 'categories'"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _check_files(json_path: str, image_root: str, paths: list[str]) -> None:
    if paths and not os.path.isdir(image_root):
        raise DatasetError(f"{json_path}: image directory {image_root} does not exist")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (", ..." if len(missing) > _MAX_LISTED else "")
        raise DatasetError(
            f"{json_path}: {len(missing)} of {len(paths)} images are missing on disk "
            f"(image root {image_root}): {listed}"
        )


def _log_stats(log: logging.Logger, json_path: str, stats: Counter[str]) -> None:
    log.info(
        "%s: %d images (%d without annotations), %d annotations kept (%d crowd)",
        json_path,
        stats["images"],
        stats["images_without_annotations"],
        stats["annotations"],
        stats["crowd_annotations"],
    )
    for key, (level, text) in STAT_REASONS.items():
        if stats[key]:
            log.log(level, "%s: %d %s [%s]", json_path, stats[key], text, key)


# ----------------------------------------------------------------------------- field helpers


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: int | float) -> bool:
    """Converts to a finite float (JSON integers beyond float range do not)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _short(v: Any, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_int(v: Any, what: str, where: str) -> int:
    if _is_number(v) and _finite(v) and v == int(v) and -_MAX_ID <= v < _MAX_ID:
        return int(v)
    raise DatasetError(f"{where}: '{what}' must be a 64-bit integer, got {_short(v)}")


def _require(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {missing}")


def _parse_categories(cats: list, path: str) -> tuple[list[int], list[str]]:
    names: dict[int, str] = {}
    for k, cat in enumerate(cats):
        where = f"{path}: categories[{k}]"
        _require(cat, ("id",), where)
        cid = _as_int(cat["id"], "id", where)
        if cid in names:
            raise DatasetError(f"{where}: duplicated category id {cid}")
        names[cid] = str(cat.get("name", cid))
    if not names:
        raise DatasetError(f"{path}: 'categories' is empty")
    ids = sorted(names)
    return ids, [names[c] for c in ids]


def _parse_images(
    imgs: list, path: str, image_root: str, *, lvis: bool = False
) -> dict[int, dict[str, Any]]:
    images: dict[int, dict[str, Any]] = {}
    for k, im in enumerate(imgs):
        where = f"{path}: images[{k}]"
        _require(
            im, ("id", "height", "width") if lvis else ("id", "file_name", "height", "width"), where
        )
        iid = _as_int(im["id"], "id", where)
        where = f"{path}: image id={iid}"
        if iid in images:
            raise DatasetError(f"{where}: duplicated image id")
        h, w = _as_int(im["height"], "height", where), _as_int(im["width"], "width", where)
        if h <= 0 or w <= 0:
            raise DatasetError(f"{where}: non-positive size {h}x{w}")
        if h * w > MAX_IMAGE_PIXELS:
            raise DatasetError(f"{where}: size {h}x{w} exceeds {MAX_IMAGE_PIXELS} pixels")
        name = lvis_file_name(im) if lvis else im["file_name"]
        if not isinstance(name, str) or not name:
            raise DatasetError(
                f"{where}: needs a 'file_name' or a 'coco_url' ending in <folder>/<file>"
                if lvis
                else f"{where}: 'file_name' must be a non-empty string"
            )
        images[iid] = {
            "file_name": os.path.abspath(os.path.join(image_root, name)),
            "height": h,
            "width": w,
        }
    return images


# ----------------------------------------------------------------------------- annotations


def _parse_annotations(
    anns: list,
    path: str,
    images: dict[int, dict[str, Any]],
    cat_to_contiguous: dict[int, int],
    stats: Counter[str],
) -> RecordColumns:
    columns = RecordColumns()
    seen_ids: set[Any] = set()
    for k, ann in enumerate(anns):
        if not (
            isinstance(ann, dict) and "image_id" in ann and "category_id" in ann and "bbox" in ann
        ):
            _require(ann, ("image_id", "category_id", "bbox"), f"{path}: annotations[{k}]")
        if "id" in ann:
            if not isinstance(ann["id"], (int, float, str)):
                raise DatasetError(
                    f"{path}: annotations[{k}]: 'id' must be a number or a string, "
                    f"got {_short(ann['id'])}"
                )
            if ann["id"] in seen_ids:
                stats["duplicate_annotation_ids"] += 1
            seen_ids.add(ann["id"])
        image_id = ann["image_id"]
        if not _is_number(image_id) or image_id not in images:
            raise DatasetError(
                f"{_where(path, k, ann)}: image_id {_short(image_id)} is not in 'images'"
            )
        category_id = ann["category_id"]
        if not _is_number(category_id) or category_id not in cat_to_contiguous:
            raise DatasetError(
                f"{_where(path, k, ann)}: unknown category_id {_short(category_id)} "
                f"(known: {sorted(cat_to_contiguous)[:20]})"
            )
        _parse_annotation(
            ann,
            path,
            k,
            images[image_id],
            int(image_id),
            cat_to_contiguous[category_id],
            stats,
            columns,
        )
    return columns


def _where(path: str, k: int, ann: dict) -> str:
    """How messages name annotation ``k``: by its id when it has one."""
    if "id" in ann:
        return f"{path}: annotation id={_short(ann['id'], 40)}"
    return f"{path}: annotations[{k}]"


def _parse_annotation(
    ann: dict,
    path: str,
    k: int,
    image: dict[str, Any],
    image_id: int,
    category: int,
    stats: Counter[str],
    columns: RecordColumns,
) -> None:
    """Append annotation ``k`` to ``columns``, or count why it is dropped. Its polygon parts get
    the per-part screen here and the geometric checks with all the others in
    :func:`~dynaseg.data.packed.pack_records`."""
    h, w = image["height"], image["width"]
    box = _inside_box(ann["bbox"], h, w)  # the common case, cheaply
    if box is None:
        box = _clip_bbox(ann["bbox"], h, w, _where(path, k, ann), stats)
        if box is None:
            return
    seg = ann.get("segmentation")
    row = len(columns.categories)
    parts: list[list] = []
    counts = None
    if seg is None:
        stats["dropped_missing_segmentation"] += 1
        return
    if isinstance(seg, list):
        parts, bad_part = _screen_polygon_parts(seg, stats)
        if bad_part is not None:
            raise DatasetError(
                f"{_where(path, k, ann)}: polygon parts must be lists of numbers "
                f"[x0, y0, x1, y1, ...], got {_short(bad_part, 80)}"
            )
        if not parts:
            stats["dropped_no_valid_polygon"] += 1
            return
    elif isinstance(seg, dict):
        seg = _check_rle(seg, h, w, _where(path, k, ann))
        if seg is None:
            stats["dropped_empty_rle"] += 1
            return
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed: stored compressed, as one string
            counts = mask_util.frPyObjects(seg, h, w)["counts"].decode("ascii")
    else:
        raise DatasetError(
            f"{_where(path, k, ann)}: 'segmentation' must be a list of polygons or an RLE dict, "
            f"got {type(seg).__name__}"
        )
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1, True, False):
        raise DatasetError(
            f"{_where(path, k, ann)}: 'iscrowd' must be 0 or 1, got {_short(iscrowd)}"
        )
    columns.image_ids.append(image_id)
    columns.categories.append(category)
    columns.boxes.append(box)
    columns.iscrowd.append(bool(iscrowd))
    if counts is not None:
        columns.rle_row.append(row)
        columns.rle_counts.append(counts)
    columns.parts += parts
    columns.part_row += [row] * len(parts)


_NUMBER_TYPES = (float, int)


def _inside_box(bbox: Any, h: int, w: int) -> tuple[float, float, float, float] | None:
    """XYWH -> XYXY when ``bbox`` is 4 numbers (not bools) inside the image with a positive
    extent, the common case; None otherwise (then :func:`_clip_bbox` decides)."""
    if type(bbox) is not list or len(bbox) != 4:
        return None
    x, y, bw, bh = bbox
    if not (
        type(x) in _NUMBER_TYPES
        and type(y) in _NUMBER_TYPES
        and type(bw) in _NUMBER_TYPES
        and type(bh) in _NUMBER_TYPES
    ):
        return None
    try:
        x, y = float(x), float(y)
        x1, y1 = x + float(bw), y + float(bh)
    except OverflowError:  # integers beyond float range
        return None
    if 0.0 <= x and 0.0 <= y and x1 <= w and y1 <= h and x1 - x > 0 and y1 - y > 0:
        return x, y, x1, y1  # comparisons with NaN are false: NaN never gets here
    return None


def _clip_bbox(
    bbox: Any, h: int, w: int, where: str, stats: Counter[str]
) -> tuple[float, float, float, float] | None:
    """COCO XYWH -> XYXY clipped to [0, w] x [0, h]; None (counted) when degenerate."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        raise DatasetError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {_short(bbox)}")
    if not all(map(_finite, bbox)):
        stats["dropped_nonfinite_bbox"] += 1
        return None
    x, y, bw, bh = (float(v) for v in bbox)
    raw = (x, y, x + bw, y + bh)
    box = (
        min(max(raw[0], 0.0), w),
        min(max(raw[1], 0.0), h),
        min(max(raw[2], 0.0), w),
        min(max(raw[3], 0.0), h),
    )
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        stats["dropped_degenerate_bbox"] += 1
        return None
    if box != raw:
        stats["clipped_bbox"] += 1
    return box


def _screen_polygon_parts(polys: list, stats: Counter[str]) -> tuple[list[list], Any]:
    """(the parts with >= 3 points, an even length and finite coordinates, the first part that is
    not a list of numbers or None); the others are counted. The geometry is checked in
    :func:`~dynaseg.data.packed.pack_records`."""
    kept = []
    for part in polys:
        try:  # sum() doubles as a fast type check: it raises TypeError on non-numbers
            total = sum(part) if type(part) is list else None
        except TypeError:
            total = None
        except OverflowError:  # a float plus an integer beyond float range
            total = math.inf
        if total is None:
            return kept, part
        if len(part) < 6 or len(part) % 2 or not _finite(total):  # NaN/inf make the sum so
            stats["dropped_polygon_parts"] += 1
            continue
        kept.append(part)
    return kept, None


def _check_rle(rle: dict, h: int, w: int, where: str) -> dict | None:
    """Validate an RLE dict; None when its area is zero."""
    _require(rle, ("size", "counts"), where + " RLE")
    size = rle["size"]
    if not isinstance(size, (list, tuple)) or list(size) != [h, w]:
        raise DatasetError(
            f"{where}: RLE size {_short(size)} does not match the image size [{h}, {w}] (h, w)"
        )
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed: alternating background/foreground run lengths
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise DatasetError(
                f"{where}: uncompressed RLE counts must be non-negative integers "
                f"summing to h*w = {h * w}"
            )
        counts = [int(c) for c in counts]  # bools -> ints
        runs = counts
    elif isinstance(counts, str):
        # pycocotools decodes without bounds checks: run lengths that do not add up to h*w read
        # or write past the mask, so they are checked here.
        runs = rle_string_counts(counts)
        if runs is None or sum(runs) != h * w:
            raise DatasetError(
                f"{where}: compressed RLE counts {_short(counts, 40)} do not decode to run "
                f"lengths summing to h*w = {h * w}"
            )
    else:
        raise DatasetError(
            f"{where}: RLE counts must be a string or a list, got {type(counts).__name__}"
        )
    return {"size": [h, w], "counts": counts} if sum(runs[1::2]) > 0 else None
