"""What LVIS v1's federated evaluation (Gupta et al. 2019) changes in COCO's.

An LVIS ground-truth file is COCO's plus: a ``frequency`` ("r" rare, "c" common, "f" frequent:
1-10, 11-100, >100 training images) on every category, and on every image the categories verified
absent (``neg_category_ids``) and those whose instances are not all annotated
(``not_exhaustive_category_ids``). The evaluation then (faster-coco-eval's ``lvis_style``, the rules
of the ``lvis`` package):

- keeps at most :data:`MAX_DETECTIONS` results per image, the highest-scoring over all categories;
- skips a detection whose category is neither annotated in its image nor listed as absent there
  (the detector is not judged on what nobody checked);
- ignores the unmatched detections of a not-exhaustive category;
- reports AP at ``maxDets`` = 300, and APr / APc / APf: AP over the rare, common and frequent
  categories.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from dynaseg.data.lvis import LVIS_IMAGE_LISTS, is_lvis
from dynaseg.evaluation.inputs import EvaluationError

__all__ = [
    "MAX_DETECTIONS",
    "FREQUENCY_METRICS",
    "is_lvis",
    "check_lvis_fields",
    "category_frequencies",
    "frequency_titles",
    "top_detections_per_image",
    "checked_detections",
]

MAX_DETECTIONS = 300
#: frequency label -> the metric averaging its categories
FREQUENCY_METRICS: dict[str, str] = {"r": "APr", "c": "APc", "f": "APf"}


def check_lvis_fields(gt: Mapping[str, Any], name: str) -> None:
    """Raise :class:`EvaluationError` (one line, names the file and the entry) unless every category
    has a frequency in {r, c, f} and every image has both federated lists of known category ids."""
    known: set[int] = set()
    for k, cat in enumerate(gt["categories"]):
        if cat.get("frequency") not in FREQUENCY_METRICS:
            raise EvaluationError(
                f"LVIS ground truth {name}: categories[{k}] needs 'frequency' 'r', 'c' or 'f', "
                f"got {cat.get('frequency')!r}"
            )
        known.add(cat["id"])
    for k, image in enumerate(gt["images"]):
        for key in LVIS_IMAGE_LISTS:
            ids = image.get(key)
            if not isinstance(ids, list):
                raise EvaluationError(
                    f"LVIS ground truth {name}: images[{k}] (id {image.get('id')!r}) needs a "
                    f"'{key}' list, got {type(ids).__name__}"
                )
            unknown = [c for c in ids if isinstance(c, (bool, list, dict)) or c not in known]
            if unknown:
                raise EvaluationError(
                    f"LVIS ground truth {name}: images[{k}] '{key}' has unknown category id "
                    f"{unknown[0]!r}"
                )


def category_frequencies(gt: Mapping[str, Any]) -> dict[int, str]:
    """Category id -> frequency label ("r", "c" or "f")."""
    return {int(c["id"]): c["frequency"] for c in gt["categories"]}


def frequency_titles(gt: Mapping[str, Any]) -> dict[str, str] | None:
    """Class name -> "rare", "common" or "frequent" (per-class tables), or None if not LVIS."""
    if not is_lvis(gt):
        return None
    title = {"r": "rare", "c": "common", "f": "frequent"}
    cats = sorted(gt["categories"], key=lambda c: c["id"])  # the per-class order
    return {str(c.get("name", c["id"])): title.get(c.get("frequency"), "?") for c in cats}


def top_detections_per_image(results: Sequence[dict], limit: int = MAX_DETECTIONS) -> list[dict]:
    """At most ``limit`` results per image, the highest-scoring (ties keep file order), in file
    order otherwise."""
    per_image: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        per_image[r["image_id"]].append(i)
    keep: list[int] = []
    for indices in per_image.values():
        if len(indices) > limit:
            indices = sorted(indices, key=lambda i: -results[i]["score"])[:limit]
        keep += indices
    return [results[i] for i in sorted(keep)]


def checked_detections(gt: Mapping[str, Any], results: Sequence[dict]) -> list[dict]:
    """The results whose category is annotated in their image or listed as absent there; the
    evaluation skips the others. (Dropped here, after :func:`top_detections_per_image` as the
    rule says, because faster-coco-eval fails on an image whose every detection it would skip.)"""
    checked: dict[Any, set] = {im["id"]: set(im["neg_category_ids"]) for im in gt["images"]}
    for a in gt["annotations"]:
        checked[a["image_id"]].add(a["category_id"])
    return [r for r in results if r["category_id"] in checked[r["image_id"]]]
