"""Reading evaluation inputs: the error every input check raises, and the JSON reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynaseg.errors import UserError
from dynaseg.utils.json_files import read_json

__all__ = ["EvaluationError", "load_json"]


class EvaluationError(UserError, ValueError):
    """Bad ground truth or results given to an evaluation; the message names the file."""


def load_json(path: str | Path, what: str) -> Any:
    """The data of a JSON file, or :class:`EvaluationError` naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"{what} '{p}' does not exist")
    try:
        return read_json(p)
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{what} '{p}' is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise EvaluationError(f"{what} '{p}' is not valid JSON: not UTF-8 text") from None
    except RecursionError:
        raise EvaluationError(f"{what} '{p}': JSON nested too deeply to parse") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise EvaluationError(f"{what} '{p}' cannot be read: {e}") from None
