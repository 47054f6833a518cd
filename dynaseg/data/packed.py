"""A dataset's annotations in a few flat numpy arrays: no Python object per image or per object.

At COCO's size (118k images, 860k polygon instances) per-record Python objects take gigabytes, and
every DataLoader worker forked from the main process slowly copies them: reading an object writes
its reference count, so the page holding it becomes private to the worker. Flat arrays are only
read, so their pages stay shared. :class:`PackedRecords` is a read-only sequence of
:class:`~dynaseg.data.coco.ImageRecord`; each ``records[i]`` is built on access from the arrays.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

import numpy as np

if TYPE_CHECKING:
    from dynaseg.data.coco import ImageRecord

__all__ = ["PackedRecords", "pack_strings"]


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
