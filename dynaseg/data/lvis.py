"""LVIS v1 files as training data: how they differ from COCO instances files.

An LVIS file is a COCO instances file plus a ``frequency`` per category and per image the lists
``neg_category_ids`` / ``not_exhaustive_category_ids`` (used by the evaluation,
:mod:`dynaseg.evaluation.lvis`). LVIS v1 images carry no ``file_name``: their ``coco_url``
(``http://images.cocodataset.org/train2017/000000391895.jpg``) names the COCO image, found at
``<image root>/train2017/000000391895.jpg`` (so the image root of both LVIS splits is the COCO
root). Annotations have no ``iscrowd``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LVIS_IMAGE_LISTS", "is_lvis", "lvis_file_name"]

LVIS_IMAGE_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")


def is_lvis(data: Mapping[str, Any]) -> bool:
    """Whether a parsed annotation file is LVIS-style: its first category carries ``frequency``
    or its first image one of the federated lists."""
    cats, images = data.get("categories") or [], data.get("images") or []
    first_cat = cats[0] if isinstance(cats[0] if cats else None, Mapping) else {}
    first_image = images[0] if isinstance(images[0] if images else None, Mapping) else {}
    return "frequency" in first_cat or any(k in first_image for k in LVIS_IMAGE_LISTS)


def lvis_file_name(image: Mapping[str, Any]) -> str | None:
    """The image's path relative to the image root: ``file_name`` if present, else the last two
    parts of ``coco_url`` ("val2017/000000000139.jpg"); None when neither is a usable string."""
    name = image.get("file_name")
    if isinstance(name, str) and name:
        return name
    url = image.get("coco_url")
    if not isinstance(url, str):
        return None
    parts = [p for p in url.split("/") if p]
    return "/".join(parts[-2:]) if len(parts) >= 2 else None
