"""Reading COCO compressed RLE strings safely: one (:func:`rle_string_counts`, Python) or many at
once (:func:`rle_strings_cover`, numpy), before a C decoder reads them.

pycocotools' decoder (and faster-coco-eval's copy) trusts the string: run lengths that do not
add up to h·w make it read or write past the mask. ``rle_string_counts`` decodes one string in
Python (~35 µs for a typical mask); :func:`rle_strings_cover` checks a whole results file in one
pass (500 000 masks in about a second), and callers fall back to the Python check only to name
the first bad string.

Format (pycocotools' ``rleFrString``): each run length is a number of 5-bit groups, one per
character ``chr(48 + g)``; bit 0x20 of a group says another group follows, bit 0x10 of the last
group is the sign; from the fourth run on, the value is a difference to the run two before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["rle_string_counts", "rle_strings_cover"]

_MAX_GROUPS = 6  # more would overflow pycocotools' 32-bit shifts (see MAX_IMAGE_PIXELS)


def rle_strings_cover(strings: Sequence[str], totals: Sequence[int]) -> bool:
    """Whether every string is well-formed (characters '0'..'o', numbers of at most 6 groups,
    no truncated last number, no negative run) and its run lengths add up to ``totals[i]``
    (h·w of its image). False says only that some string is bad."""
    if not strings:
        return True
    try:
        data = "".join(strings).encode("ascii")
    except UnicodeEncodeError:
        return False
    lengths = np.fromiter(map(len, strings), np.int64, len(strings))
    if (lengths == 0).any():  # an empty string has no runs: covers nothing
        return False
    raw = np.frombuffer(data, np.uint8)
    if ((raw < 48) | (raw >= 112)).any():  # a group is chr(48 + 0..63)
        return False
    groups = raw - np.uint8(48)
    ends = (groups & 0x20) == 0  # the last group of a number
    if not ends[np.cumsum(lengths) - 1].all():  # a truncated last number
        return False
    # numbers: their first character, position of each group in its number
    is_start = np.empty(len(groups), bool)
    is_start[0], is_start[1:] = True, ends[:-1]
    starts = np.flatnonzero(is_start)
    index = np.arange(len(groups), dtype=np.int32)
    position = index - np.maximum.accumulate(np.where(is_start, index, 0))
    if position.max() >= _MAX_GROUPS:
        return False
    value = np.add.reduceat((groups & 0x1F).astype(np.int32) << (5 * position), starts)
    last = np.flatnonzero(ends)
    negative = (groups[last] & 0x10) != 0
    value[negative] -= np.int32(1) << (5 * (position[last][negative] + 1))
    value = value.astype(np.int64)
    # runs: from the fourth on, value + the run two before, within each string: running sums of
    # the odd-indexed and of the even-indexed (from the third) values, restarted at each string
    char_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    numbers = np.add.reduceat(ends, char_start).astype(np.int64)  # per string
    first_number = np.concatenate([[0], np.cumsum(numbers)[:-1]])
    index = np.arange(len(value)) - _per_number(first_number, first_number, len(value))
    odd, even = (index & 1) == 1, ((index & 1) == 0) & (index >= 2)
    runs = value.copy()
    for chain in (odd, even):
        sums = np.cumsum(np.where(chain, value, 0))
        before = np.where(first_number > 0, sums[first_number - 1], 0)  # earlier strings' part
        np.copyto(runs, sums - _per_number(before, first_number, len(value)), where=chain)
    string_of = _per_number(np.arange(len(strings)), first_number, len(value))
    if (runs < 0).any():
        return False
    covered = np.bincount(string_of, weights=runs, minlength=len(strings))
    return bool((covered == np.asarray(totals, np.float64)).all())


def _per_number(per_string: np.ndarray, first_number: np.ndarray, count: int) -> np.ndarray:
    """(count,): each number gets its string's value (``np.repeat`` by a running sum of steps,
    faster for many short strings)."""
    steps = np.zeros(count, np.int64)
    steps[first_number] = np.diff(per_string, prepend=0)
    return np.cumsum(steps)


def rle_string_counts(text: str) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``), or None when
    the string is malformed: a character outside '0'..'o', a number of more than 6 characters
    (beyond ``MAX_IMAGE_PIXELS``), a truncated last number, or a negative run length."""
    runs: list[int] = []
    value, shift = 0, 0
    for ch in text:
        c = ord(ch) - 48
        if not 0 <= c < 64 or shift >= 30:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:  # more 5-bit groups follow
            continue
        if c & 0x10:  # sign bit of the last group
            value -= 1 << shift
        if len(runs) > 2:  # from the fourth run on, counts are stored as differences
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value, shift = 0, 0
    return runs if shift == 0 else None
