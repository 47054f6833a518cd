"""The base of every "the user's input is wrong" error: the CLI prints these as one line (exit 2).

This module imports nothing from dynaseg, so every floor can subclass ``UserError``.
"""

from __future__ import annotations

__all__ = ["UserError", "USER_ERRORS"]


class UserError(Exception):
    """A problem the user can fix (a bad file, flag or value); the message names the file and the problem."""


# FloatingPointError: the trainer's non-finite loss / gradient stop (names the term and iteration).
USER_ERRORS: tuple[type[Exception], ...] = (UserError, FileNotFoundError, FloatingPointError)
