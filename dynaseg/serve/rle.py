"""COCO RLE of a full-image mask given only the window that holds its pixels, without ever making
the full-image mask: memory and time in proportion to the window."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["window_rle", "crop_rle", "decode_crop"]


def window_rle(
    window: np.ndarray, *, top: int, left: int, image_size: tuple[int, int]
) -> dict[str, object]:
    """Compressed COCO RLE (``counts`` as str) of the (H, W) mask that is ``window`` (h, w bool) at
    (``top``, ``left``) and False elsewhere; equal to ``pycocotools.mask.encode`` of that mask.

    COCO RLE runs go down the columns. Padding the window with one False row above and below
    stands for the False pixels between its columns, so the runs' boundaries are the changes of
    value in the padded window read down its columns, mapped back to full-image positions.
    """
    height, width = image_size
    rows = window.shape[0] + 2
    padded = np.zeros((window.shape[1], rows), dtype=np.int8)  # one padded column per row
    padded[:, 1:-1] = window.T
    column_major = padded.reshape(-1)
    changes = np.flatnonzero(column_major[1:] != column_major[:-1]) + 1
    column, row = np.divmod(changes, rows)
    full = (left + column).astype(np.int64) * height + (top + row - 1)
    # A window as tall as the image: a column's last change and the next one's first meet and
    # cancel; a change at the very end is no change.
    positions, times = np.unique(full, return_counts=True)
    full = positions[(times == 1) & (positions < height * width)]
    bounds = np.concatenate(([0], full, [height * width]))
    counts = np.diff(bounds).tolist()
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def crop_rle(window: np.ndarray) -> dict[str, object]:
    """RLE of the window alone (to keep many windows small until they are drawn)."""
    return mask_utils.encode(np.asfortranarray(window[:, :, None].astype(np.uint8)))[0]


def decode_crop(rle: dict[str, object]) -> np.ndarray:
    """The (h, w) bool window back from :func:`crop_rle`."""
    return mask_utils.decode(rle).astype(bool)
