"""Load and validate a COCO panoptic JSON (things and stuff) into typed, immutable records.

A COCO panoptic dataset is a JSON file plus one PNG per image whose pixels encode segment ids
(id = R + 256·G + 256²·B, 0 = void, see :func:`dynaseg.structures.panoptic.rgb_to_id`). The JSON's
``images`` give the image files and sizes, its ``annotations`` give, per image, the PNG's
``file_name`` (relative to the panoptic root) and ``segments_info`` (segment id -> category), and its
``categories`` say which classes are things (``isthing`` = 1) and which are stuff.

Policy, as in :mod:`dynaseg.data.coco`: an *inconsistent* file (missing fields, unknown category or
image, duplicated ids, missing files on disk) raises :class:`~dynaseg.data.coco.DatasetError`
naming the file and the offending entry. An image listed in ``images`` without a panoptic
annotation is kept with no segments (all void) and counted in ``images_without_annotations``.
The PNG contents are checked when a sample is read (see
:class:`~dynaseg.data.panoptic_dataset.PanopticDataset`), not here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from dynaseg.data.coco import (
    DatasetError,
    _as_int,
    _check_files,
    _finite,
    _is_number,
    _parse_images,
    _require,
    _short,
    read_coco_json,
)
from dynaseg.structures.panoptic import IGNORE_LABEL

__all__ = ["PanopticSegmentRecord", "PanopticImageRecord", "CocoPanoptic", "load_coco_panoptic"]

logger = logging.getLogger("dynaseg.data")

_MAX_LISTED = 5  # missing files named in an error message
_MAX_SEGMENT_ID = 256**3  # ids are stored as 24-bit RGB


@dataclass(frozen=True, slots=True)
class PanopticSegmentRecord:
    """One segment of an image's panoptic PNG.

    Attributes:
        id: value of the segment's pixels in the PNG (R + 256·G + 256²·B), in [1, 256³).
        category: contiguous id among the things (``isthing``) or among the stuff classes.
        isthing: thing (countable object) or stuff.
        iscrowd: crowd region; neither an instance nor a stuff label in training.
        bbox_xyxy: (x0, y0, x1, y1) absolute pixels from the JSON's ``bbox`` (XYWH), or None when the
            JSON gives none. Informational: training boxes come from the PNG.
    """

    id: int
    category: int
    isthing: bool
    iscrowd: bool
    bbox_xyxy: tuple[float, float, float, float] | None


@dataclass(frozen=True, slots=True)
class PanopticImageRecord:
    """One image, its panoptic PNG and the segments the PNG contains.

    Attributes:
        image_id: COCO image id.
        file_name: absolute image path.
        height, width: image size (H, W) from the JSON; the PNG must have the same size.
        panoptic_file: absolute PNG path, or None when the image has no panoptic annotation
            (then ``segments`` is empty and every pixel is void).
        segments: in the JSON's order, ids unique within the image.
    """

    image_id: int
    file_name: str
    height: int
    width: int
    panoptic_file: str | None
    segments: tuple[PanopticSegmentRecord, ...]


@dataclass(frozen=True)
class CocoPanoptic:
    """A validated panoptic dataset; stands in for :class:`~dynaseg.data.coco.CocoInstances` where a
    dataset needs ``records`` and ``class_names`` (the thing classes).

    Attributes:
        records: one per image, in the JSON's image order.
        category_ids: COCO category id of each contiguous *thing* id 0..T-1 (ascending).
        class_names: name of each contiguous thing id.
        stuff_category_ids: COCO category id of each contiguous *stuff* id 0..S-1 (ascending).
        stuff_names: name of each contiguous stuff id.
        stats: ``images``, ``images_without_annotations``, ``segments``, ``thing_segments``,
            ``stuff_segments``, ``crowd_segments``.
    """

    records: list[PanopticImageRecord]
    category_ids: list[int]
    class_names: list[str]
    stuff_category_ids: list[int]
    stuff_names: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    json_path: str = ""  # the panoptic JSON, named in errors raised when reading samples

    @property
    def num_classes(self) -> int:
        """Number of thing classes T."""
        return len(self.category_ids)

    @property
    def num_stuff_classes(self) -> int:
        """Number of stuff classes S."""
        return len(self.stuff_category_ids)


def load_coco_panoptic(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    panoptic_root: str | os.PathLike,
    *,
    check_files: bool = True,
    log: logging.Logger = logger,
) -> CocoPanoptic:
    """Parse and validate a COCO panoptic file.

    Args:
        json_path: the panoptic JSON.
        image_root: directory the ``images[].file_name`` are relative to.
        panoptic_root: directory the ``annotations[].file_name`` (PNGs) are relative to.
        check_files: raise if any listed image or PNG is missing on disk.
        log: where the summary line goes.

    Raises:
        DatasetError: the file is missing, not JSON, or inconsistent (see module docstring).
    """
    json_path, image_root, panoptic_root = (
        os.fspath(p) for p in (json_path, image_root, panoptic_root)
    )
    data = read_coco_json(json_path)
    categories = _parse_categories(data["categories"], json_path)
    images = _parse_images(data["images"], json_path, image_root)
    per_image = _parse_annotations(
        data["annotations"], json_path, panoptic_root, images, categories
    )
    if check_files:
        _check_files(json_path, image_root, [im["file_name"] for im in images.values()])
        _check_pngs(json_path, panoptic_root, [png for png, _ in per_image.values()])

    records = []
    for image_id, im in images.items():
        png, segments = per_image.get(image_id, (None, ()))
        records.append(
            PanopticImageRecord(
                image_id=image_id,
                file_name=im["file_name"],
                height=im["height"],
                width=im["width"],
                panoptic_file=png,
                segments=tuple(segments),
            )
        )
    thing_ids = sorted(c for c, (isthing, _) in categories.items() if isthing)
    stuff_ids = sorted(c for c, (isthing, _) in categories.items() if not isthing)
    segs = [s for r in records for s in r.segments]
    stats = {
        "images": len(records),
        "images_without_annotations": sum(r.panoptic_file is None for r in records),
        "segments": len(segs),
        "thing_segments": sum(s.isthing for s in segs),
        "stuff_segments": sum(not s.isthing for s in segs),
        "crowd_segments": sum(s.iscrowd for s in segs),
    }
    log.info(
        "%s: %d images (%d without a panoptic annotation), %d segments (%d things, %d stuff, "
        "%d crowd), %d thing and %d stuff classes",
        json_path,
        stats["images"],
        stats["images_without_annotations"],
        stats["segments"],
        stats["thing_segments"],
        stats["stuff_segments"],
        stats["crowd_segments"],
        len(thing_ids),
        len(stuff_ids),
    )
    return CocoPanoptic(
        records=records,
        category_ids=thing_ids,
        class_names=[categories[c][1] for c in thing_ids],
        stuff_category_ids=stuff_ids,
        stuff_names=[categories[c][1] for c in stuff_ids],
        stats=stats,
        json_path=json_path,
    )


# ----------------------------------------------------------------------------- categories


def _parse_categories(cats: list, path: str) -> dict[int, tuple[bool, str]]:
    """COCO category id -> (isthing, name)."""
    out: dict[int, tuple[bool, str]] = {}
    for k, cat in enumerate(cats):
        where = f"{path}: categories[{k}]"
        _require(cat, ("id", "isthing"), where)
        cid = _as_int(cat["id"], "id", where)
        if cid in out:
            raise DatasetError(f"{where}: duplicated category id {cid}")
        if cat["isthing"] not in (0, 1, True, False):
            raise DatasetError(f"{where}: 'isthing' must be 0 or 1, got {_short(cat['isthing'])}")
        out[cid] = (bool(cat["isthing"]), str(cat.get("name", cid)))
    if not out:
        raise DatasetError(f"{path}: 'categories' is empty")
    num_stuff = sum(not isthing for isthing, _ in out.values())
    if num_stuff >= IGNORE_LABEL:
        raise DatasetError(
            f"{path}: {num_stuff} stuff categories; at most {IGNORE_LABEL - 1} are "
            f"supported ({IGNORE_LABEL} is the ignore label of the semantic map)"
        )
    return out


def _contiguous(categories: dict[int, tuple[bool, str]]) -> dict[int, int]:
    """COCO category id -> contiguous id within its kind (things and stuff numbered separately)."""
    out: dict[int, int] = {}
    for kind in (True, False):
        for i, c in enumerate(
            sorted(c for c, (isthing, _) in categories.items() if isthing == kind)
        ):
            out[c] = i
    return out


# ----------------------------------------------------------------------------- annotations


def _parse_annotations(
    anns: list,
    path: str,
    panoptic_root: str,
    images: dict[int, dict[str, Any]],
    categories: dict[int, tuple[bool, str]],
) -> dict[int, tuple[str, list[PanopticSegmentRecord]]]:
    """image id -> (absolute PNG path, segments)."""
    contiguous = _contiguous(categories)
    per_image: dict[int, tuple[str, list[PanopticSegmentRecord]]] = {}
    for k, ann in enumerate(anns):
        where = f"{path}: annotations[{k}]"
        _require(ann, ("image_id", "file_name", "segments_info"), where)
        image_id = ann["image_id"]
        if not _is_number(image_id) or image_id not in images:
            raise DatasetError(f"{where}: image_id {_short(image_id)} is not in 'images'")
        image_id = int(image_id)
        where = f"{path}: annotation of image id={image_id}"
        if image_id in per_image:
            raise DatasetError(f"{where}: image has more than one panoptic annotation")
        if not isinstance(ann["file_name"], str) or not ann["file_name"]:
            raise DatasetError(f"{where}: 'file_name' must be a non-empty string")
        if not isinstance(ann["segments_info"], list):
            raise DatasetError(
                f"{where}: 'segments_info' must be a list, "
                f"got {type(ann['segments_info']).__name__}"
            )
        png = os.path.abspath(os.path.join(panoptic_root, ann["file_name"]))
        segments: list[PanopticSegmentRecord] = []
        seen: set[int] = set()
        for j, seg in enumerate(ann["segments_info"]):
            segment = _parse_segment(
                seg, f"{where} ({ann['file_name']}) segments_info[{j}]", categories, contiguous
            )
            if segment.id in seen:
                raise DatasetError(
                    f"{where} ({ann['file_name']}): duplicated segment id {segment.id}"
                )
            seen.add(segment.id)
            segments.append(segment)
        per_image[image_id] = (png, segments)
    return per_image


def _parse_segment(
    seg: Any, where: str, categories: dict[int, tuple[bool, str]], contiguous: dict[int, int]
) -> PanopticSegmentRecord:
    _require(seg, ("id", "category_id"), where)
    sid = _as_int(seg["id"], "id", where)
    if not 0 < sid < _MAX_SEGMENT_ID:
        raise DatasetError(f"{where}: segment id {sid} outside [1, 256³) (0 is void)")
    category_id = seg["category_id"]
    if not _is_number(category_id) or category_id not in categories:
        raise DatasetError(
            f"{where}: unknown category_id {_short(category_id)} (known: {sorted(categories)[:20]})"
        )
    iscrowd = seg.get("iscrowd", 0)
    if iscrowd not in (0, 1, True, False):
        raise DatasetError(f"{where}: 'iscrowd' must be 0 or 1, got {_short(iscrowd)}")
    bbox = seg.get("bbox")
    if bbox is not None:
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(map(_is_number, bbox))
            or not all(map(_finite, bbox))
        ):
            raise DatasetError(
                f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {_short(bbox)}"
            )
        x, y, w, h = (float(v) for v in bbox)
        bbox = (x, y, x + w, y + h)
    category_id = int(category_id)
    return PanopticSegmentRecord(
        id=sid,
        category=contiguous[category_id],
        isthing=categories[category_id][0],
        iscrowd=bool(iscrowd),
        bbox_xyxy=bbox,
    )


def _check_pngs(json_path: str, panoptic_root: str, paths: list[str]) -> None:
    if paths and not os.path.isdir(panoptic_root):
        raise DatasetError(f"{json_path}: panoptic PNG directory {panoptic_root} does not exist")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED]) + (", ..." if len(missing) > _MAX_LISTED else "")
        raise DatasetError(
            f"{json_path}: {len(missing)} of {len(paths)} panoptic PNGs are missing on "
            f"disk (panoptic root {panoptic_root}): {listed}"
        )
