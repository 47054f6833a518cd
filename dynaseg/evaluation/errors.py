"""The error every evaluation input check raises."""

from __future__ import annotations

from dynaseg.errors import UserError

__all__ = ["EvaluationError"]


class EvaluationError(UserError, ValueError):
    """Bad ground truth or results given to an evaluation; the message names the file."""
