"""Reading evaluation inputs: the error every input check raises, and the JSON reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynaseg.errors import UserError
from dynaseg.utils.json_files import JSONFileError, read_json

__all__ = ["EvaluationError", "load_json"]


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
