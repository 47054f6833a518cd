"""A dataset's annotations in a few flat numpy arrays: no Python object per image or per object.

At COCO's size (118k images, 860k polygon instances) per-record Python objects take gigabytes, and
every DataLoader worker forked from the main process slowly copies them: reading an object writes
its reference count, so the page holding it becomes private to the worker. Flat arrays are only
read, so their pages stay shared. :class:`PackedRecords` is a read-only sequence of
:class:`~dynaseg.data.coco.ImageRecord`; each ``records[i]`` is built on access from the arrays.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, overload

import numpy as np

if TYPE_CHECKING:
    from dynaseg.data.coco import ImageRecord

__all__ = ["PackedRecords", "RecordColumns", "pack_records", "pack_strings"]


def pack_strings(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 strings -> (bytes (B,) uint8, offsets (N + 1,) int64); string ``i`` is
    ``bytes[offsets[i]:offsets[i + 1]]``."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def _string(data: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return data[offsets[i] : offsets[i + 1]].tobytes().decode("utf-8")


@dataclass(frozen=True, eq=False)
class PackedRecords(Sequence["ImageRecord"]):
    """N images and M annotations (kept ones, grouped by image in file order).

    Image arrays (N,): ``image_ids`` int64, ``heights`` / ``widths`` int32, file names in
    ``name_bytes`` / ``name_offsets`` (N + 1). ``ann_offsets`` (N + 1): image ``i`` owns
    annotations ``ann_offsets[i]:ann_offsets[i + 1]``.

    Annotation arrays (M,): ``categories`` int32 (contiguous ids), ``boxes`` (M, 4) float64 XYXY,
    ``iscrowd`` bool; a polygon annotation owns ``part_count[j]`` parts from ``part_first[j]``,
    part ``p`` being ``coords[part_offsets[p]:part_offsets[p + 1]]`` ([x0, y0, x1, y1, ...],
    float64); an RLE annotation owns no part and its compressed counts are string ``rle_index[j]``
    of ``rle_bytes`` / ``rle_offsets``.
    """

    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    name_bytes: np.ndarray
    name_offsets: np.ndarray
    ann_offsets: np.ndarray
    categories: np.ndarray
    boxes: np.ndarray
    iscrowd: np.ndarray
    part_first: np.ndarray
    part_count: np.ndarray
    part_offsets: np.ndarray
    coords: np.ndarray
    rle_index: np.ndarray
    rle_bytes: np.ndarray
    rle_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)

    @overload
    def __getitem__(self, i: int) -> ImageRecord: ...

    @overload
    def __getitem__(self, i: slice) -> list[ImageRecord]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} images")
        return self._record(int(i) % n)

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self._record(i) for i in range(len(self)))

    def _record(self, i: int) -> ImageRecord:
        from dynaseg.data.coco import AnnotationRecord, ImageRecord

        h, w = int(self.heights[i]), int(self.widths[i])
        first, last = int(self.ann_offsets[i]), int(self.ann_offsets[i + 1])
        columns = zip(
            self.categories[first:last].tolist(),
            self.boxes[first:last].tolist(),
            self.iscrowd[first:last].tolist(),
            self.part_first[first:last].tolist(),
            self.part_count[first:last].tolist(),
            self.rle_index[first:last].tolist(),
        )
        annotations = tuple(
            AnnotationRecord(
                category=category,
                bbox_xyxy=tuple(box),
                segmentation=self._polygons(part, count) if count else self._rle(rle, h, w),
                iscrowd=crowd,
            )
            for category, box, crowd, part, count, rle in columns
        )
        return ImageRecord(
            image_id=int(self.image_ids[i]),
            file_name=_string(self.name_bytes, self.name_offsets, i),
            height=h,
            width=w,
            annotations=annotations,
        )

    def _polygons(self, first: int, count: int) -> list[list[float]]:
        """Parts ``first .. first + count - 1``, contiguous in ``coords``: one slice, then split."""
        offsets = self.part_offsets[first : first + count + 1].tolist()
        values = self.coords[offsets[0] : offsets[-1]].tolist()
        base = offsets[0]
        return [values[a - base : b - base] for a, b in zip(offsets, offsets[1:])]

    def _rle(self, index: int, h: int, w: int) -> dict:
        return {"size": [h, w], "counts": _string(self.rle_bytes, self.rle_offsets, index)}

    # ------------------------------------------------------------------ whole-dataset queries
    def aspect_ratios(self) -> np.ndarray:
        """width / height of each image (N,)."""
        return self.widths / self.heights

    def categories_per_image(self, *, crowd: bool = False) -> list[list[int]]:
        """The contiguous categories of each image's annotations (crowd ones only if ``crowd``)."""
        keep = np.ones(len(self.categories), bool) if crowd else ~self.iscrowd
        per_image = np.split(self.categories, self.ann_offsets[1:-1])
        keeps = np.split(keep, self.ann_offsets[1:-1])
        return [c[k].tolist() for c, k in zip(per_image, keeps)]

    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return sum(getattr(self, f).nbytes for f in self.__dataclass_fields__)


# ----------------------------------------------------------------------------- building
@dataclass
class RecordColumns:
    """Kept annotations, one row each in file order, while parsing (``dynaseg.data.coco``) (see :func:`pack_records`).

    ``parts`` are the polygon parts that passed the per-part screen, ``part_row`` the row of each;
    ``rle_row`` / ``rle_counts`` the compressed counts of the RLE rows.
    """

    image_ids: list[int] = field(default_factory=list)
    categories: list[int] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    iscrowd: list[bool] = field(default_factory=list)
    parts: list[list] = field(default_factory=list)
    part_row: list[int] = field(default_factory=list)
    rle_row: list[int] = field(default_factory=list)
    rle_counts: list[str] = field(default_factory=list)


def pack_records(
    images: dict[int, dict[str, Any]], columns: RecordColumns, stats: Counter[str]
) -> PackedRecords:
    """The parsed images and annotation rows as :class:`PackedRecords`, after the geometric
    checks of the polygon parts (a part must overlap the image, lie within one image size of it,
    and have a non-zero area; an annotation left without parts is dropped, both counted)."""
    index_of = {image_id: i for i, image_id in enumerate(images)}
    sizes = np.array([(im["height"], im["width"]) for im in images.values()], np.int64).reshape(
        -1, 2
    )
    rows = len(columns.categories)
    image_index = np.fromiter((index_of[i] for i in columns.image_ids), np.int64, rows)
    part_row = np.asarray(columns.part_row, np.int64)
    lengths = np.fromiter(map(len, columns.parts), np.int64, len(columns.parts))
    ok, coords = _check_polygon_parts(columns.parts, lengths, sizes[image_index[part_row]])
    del columns.parts
    stats["dropped_polygon_parts"] += int((~ok).sum())
    kept_parts = np.bincount(part_row[ok], minlength=rows)
    has_parts = np.bincount(part_row, minlength=rows) > 0
    keep = ~(has_parts & (kept_parts == 0))
    stats["dropped_no_valid_polygon"] += int((~keep).sum())

    coords = coords[np.repeat(ok, lengths)] if len(coords) else coords
    part_offsets = np.zeros(int(ok.sum()) + 1, np.int64)
    np.cumsum(lengths[ok], out=part_offsets[1:])
    part_first = np.zeros(rows, np.int64)
    np.cumsum(kept_parts[:-1], out=part_first[1:])
    rle_index = np.full(rows, -1, np.int64)
    rle_index[np.asarray(columns.rle_row, np.int64)] = np.arange(len(columns.rle_row))
    rle_bytes, rle_offsets = pack_strings(columns.rle_counts)

    order = np.flatnonzero(keep)
    order = order[np.argsort(image_index[order], kind="stable")]  # grouped by image, file order
    ann_offsets = np.zeros(len(images) + 1, np.int64)
    np.cumsum(np.bincount(image_index[order], minlength=len(images)), out=ann_offsets[1:])
    name_bytes, name_offsets = pack_strings([im["file_name"] for im in images.values()])
    return PackedRecords(
        image_ids=np.fromiter(images, np.int64, len(images)),
        heights=sizes[:, 0].astype(np.int32),
        widths=sizes[:, 1].astype(np.int32),
        name_bytes=name_bytes,
        name_offsets=name_offsets,
        ann_offsets=ann_offsets,
        categories=np.asarray(columns.categories, np.int32).reshape(-1)[order],
        boxes=np.asarray(columns.boxes, np.float64).reshape(-1, 4)[order],
        iscrowd=np.asarray(columns.iscrowd, bool).reshape(-1)[order],
        part_first=part_first[order],
        part_count=kept_parts[order],
        part_offsets=part_offsets,
        coords=coords,
        rle_index=rle_index[order],
        rle_bytes=rle_bytes,
        rle_offsets=rle_offsets,
    )


def _check_polygon_parts(
    parts: list[list], lengths: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(P,) bool: which parts overlap their image, lie within one image size of it (pycocotools'
    rasterisation time grows with the coordinates) and have a non-zero area; and all the parts'
    coordinates, flat (float64). ``sizes`` (P, 2): (h, w) of each part's image."""
    try:
        flat = np.fromiter(chain.from_iterable(parts), np.float64, int(lengths.sum()))
    except OverflowError:  # integers beyond float range whose sum is finite: exact arithmetic
        ok = [_polygon_part_fits(p, h, w) for p, (h, w) in zip(parts, sizes.tolist())]
        kept = (p if fits else [0.0] * len(p) for p, fits in zip(parts, ok))
        flat = np.fromiter(chain.from_iterable(kept), np.float64, int(lengths.sum()))
        return np.array(ok, bool).reshape(-1), flat
    if not len(parts):
        return np.zeros(0, bool), flat
    xs, ys = flat[0::2], flat[1::2]
    starts = np.zeros(len(parts), np.int64)
    np.cumsum(lengths[:-1] // 2, out=starts[1:])
    following = np.arange(1, len(xs) + 1)
    following[starts + lengths // 2 - 1] = starts  # the vertex after the last is the first
    twice_area = np.add.reduceat(xs * ys[following] - ys * xs[following], starts)
    x0, x1 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y0, y1 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    h, w = sizes[:, 0], sizes[:, 1]
    outside = (x0 >= w) | (y0 >= h) | (x1 <= 0) | (y1 <= 0)
    too_far = (x0 < -w) | (y0 < -h) | (x1 > 2 * w) | (y1 > 2 * h)
    return ~(outside | too_far | (np.abs(twice_area) / 2.0 < 1e-6)), flat


def _polygon_part_fits(part: list, h: int, w: int) -> bool:
    """:func:`_check_polygon_parts` for one part, in exact arithmetic (huge integers)."""
    xs, ys = part[0::2], part[1::2]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return not (
        x0 >= w
        or y0 >= h
        or x1 <= 0
        or y1 <= 0
        or x0 < -w
        or y0 < -h
        or x1 > 2 * w
        or y1 > 2 * h
        or _polygon_area(part) < 1e-6
    )


def _polygon_area(coords: list[float]) -> float:
    xs, ys = coords[0::2], coords[1::2]  # shoelace formula
    twice = sum(map(operator.mul, xs, ys[1:] + ys[:1])) - sum(
        map(operator.mul, ys, xs[1:] + xs[:1])
    )
    return abs(twice) / 2.0
