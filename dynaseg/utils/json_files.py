"""Reading JSON files of dataset size (annotation and result files of hundreds of MB)."""

from __future__ import annotations

import json
import os
from typing import Any

import orjson

__all__ = ["read_json"]


def read_json(path: str | os.PathLike) -> Any:
    """The data of a JSON file: orjson (about twice as fast as ``json`` on COCO's files), and
    ``json`` for files orjson refuses, which accepts NaN and Infinity and names the position of a
    syntax error. Raises what ``open`` and ``json.loads`` raise (``OSError``, ``ValueError``,
    ``UnicodeDecodeError``, ``RecursionError``)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8"))
