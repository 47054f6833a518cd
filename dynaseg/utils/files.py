"""Files that readers never see half-written; output folders checked before a command does any work."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynaseg.errors import UserError

__all__ = ["atomic_write", "check_output_folder"]

_UMASK = os.umask(
    0o022
)  # read (and restored) once, at import: os.umask can only be read by setting it
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old or the new file, never half.

    A process killed mid-write leaves a hidden ``.NAME.*.tmp`` file (see ``remove_stale_temp_files``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_output_folder(path: str | os.PathLike, *, option: str) -> Path:
    """``path`` as a Path if a command can write its files there, else a one-line UserError.

    Refused: an empty path (it would write into the current folder), a path that is a file or lies
    under one, and a folder that cannot be created or written in. Creates nothing. ``option`` names
    where the path came from (``output_dir``, ``--output``) in the message.
    """
    if not os.fspath(path).strip():
        raise UserError(f"{option} is empty: give the folder to write to")
    out = Path(path)
    for folder in (out, *out.parents):  # the first one that exists must be a writable folder
        if folder.is_dir():
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"{option} '{out}': cannot write in {folder} (permission denied)")
            return out
        if os.path.lexists(folder):
            where = "" if folder == out else f" lies under {folder}, which"
            raise UserError(f"{option} '{out}'{where} is a file, not a folder")
    return out
