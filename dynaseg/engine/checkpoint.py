"""Weights (safetensors) and resumable training state, written atomically, loaded without pickle code."""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dynaseg import __version__
from dynaseg.errors import UserError
from dynaseg.modeling.backbone.pretrained import read_state_dict
from dynaseg.utils.files import atomic_write

__all__ = [
    "save_weights",
    "load_weights",
    "load_model_state",
    "read_metadata",
    "save_training_state",
    "load_training_state",
    "find_last_checkpoint",
    "remove_stale_temp_files",
    "CheckpointError",
    "WEIGHTS_FORMAT",
    "TRAINING_STATE_FORMAT",
]

logger = logging.getLogger("dynaseg.checkpoint")
_LAST = "last_checkpoint"
_STATE_NAME = re.compile(r"model_(\d+)\.pt")
_REQUIRED_STATE = ("iteration", "model")
WEIGHTS_FORMAT = 1  # layout of model_final.safetensors; bump on incompatible changes
TRAINING_STATE_FORMAT = 1  # layout of model_XXXXXXX.pt; files without a number are format 1


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the mismatch."""


def remove_stale_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete the temporary files that writes of checkpoints, weights and the pointer left when killed."""
    output_dir = Path(output_dir)
    stale = [p for pattern in (".model_*.tmp", f".{_LAST}.*.tmp") for p in output_dir.glob(pattern)]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info(
            "removed %d unfinished checkpoint file(s) left by an interrupted run: %s",
            len(stale),
            ", ".join(p.name for p in stale[:3]),
        )
    return stale


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_weights(
    model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None
) -> None:
    """Model weights as safetensors; ``metadata`` values are stored JSON-encoded, with the format and version."""
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    meta = {"weights_format": WEIGHTS_FORMAT, "dynaseg_version": __version__, **(metadata or {})}
    meta = {k: json.dumps(v) for k, v in meta.items()}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a safetensors weights file ({} for other formats)."""
    if Path(path).suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read weights metadata ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """``Type: first sentence`` of an exception, without terminal colour codes."""
    if isinstance(e, pickle.UnpicklingError):
        return "it holds pickled objects other than tensors and plain values; refused without running them"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    text = re.split(r"(?<=\.) |\n", text, maxsplit=1)[0] if text else ""
    return f"{type(e).__name__}: {text}"[:300]


def _check_format(path: str | Path, kind: str, found: Any, supported: int, version: Any) -> None:
    if found is None:
        return
    if not isinstance(found, int) or found > supported or found < 1:
        raise CheckpointError(
            f"{path}: {kind} format {found!r} (written by dynaseg {version or '?'}) is not "
            f"readable by dynaseg {__version__}, which reads format {supported}"
        )


def _listing(keys: list[str], limit: int = 3) -> str:
    more = f", … {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} ({', '.join(keys[:limit])}{more})"


def load_model_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str | Path, strict: bool = True
) -> None:
    """Copy ``state`` into ``model``; missing, unexpected or wrong-shape keys raise a ``CheckpointError``
    naming ``source`` (with ``strict=False`` they are skipped and logged)."""
    model = _unwrap(model)
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = [
        f"{name} {_listing(keys)}"
        for name, keys in (("wrong-shape", wrong), ("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    if problems and strict:
        raise CheckpointError(
            f"{source}: weights do not match the model "
            f"({type(model).__name__}, {len(own)} tensors): " + "; ".join(problems)
        )
    if problems:
        logger.warning("%s: partial load, skipped: %s", source, "; ".join(problems))
    model.load_state_dict(
        {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False
    )


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load weights; with ``strict`` any missing, unexpected or wrong-shape key is an error naming them."""
    try:
        state = read_state_dict(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    meta = read_metadata(path)
    _check_format(
        path, "weights", meta.get("weights_format"), WEIGHTS_FORMAT, meta.get("dynaseg_version")
    )
    load_model_state(model, state, source=path, strict=strict)


def save_training_state(output_dir: str | Path, iteration: int, state: dict[str, Any]) -> Path:
    """Write ``model_{iteration:07d}.pt`` (tensors, ints, floats, strings only) and point ``last_checkpoint`` at it."""
    output_dir = Path(output_dir)
    path = output_dir / f"model_{iteration:07d}.pt"
    payload = {
        "iteration": iteration,
        "format": TRAINING_STATE_FORMAT,
        "dynaseg_version": __version__,
        **state,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    atomic_write(output_dir / _LAST, lambda tmp: Path(tmp).write_text(path.name))
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a training state with ``weights_only=True`` (no arbitrary objects are unpickled)."""
    state = _read_state(path, mmap=False)
    _check_format(
        path,
        "training state",
        state.get("format"),
        TRAINING_STATE_FORMAT,
        state.get("dynaseg_version"),
    )
    missing = [k for k in _REQUIRED_STATE if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a dynaseg training state (no {', '.join(missing)})")
    return state


def _read_state(path: str | Path, *, mmap: bool) -> dict[str, Any]:
    if mmap and Path(path).is_file() and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: cannot read training state (truncated, or not written by torch.save)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # missing, truncated, pickled code
        raise CheckpointError(f"{path}: cannot read training state ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: not a dynaseg training state (a {type(state).__name__}, not a dict)"
        )
    return state


def _iteration(path: Path) -> int | None:
    match = _STATE_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    """The training state to resume from: the one ``last_checkpoint`` names if it is readable.

    Otherwise (no pointer, or it names a missing or unreadable file) the newest readable
    ``model_*.pt``, no newer than the pointer's. Readability is checked cheaply (memory-mapped,
    ``weights_only``). ``None`` when there is no state at all; a ``CheckpointError`` when there are
    states but none is readable.
    """
    output_dir = Path(output_dir)
    pointer = output_dir / _LAST
    named = output_dir / pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    states = sorted(
        (p for p in output_dir.glob("model_*.pt") if _iteration(p) is not None),
        key=_iteration,
        reverse=True,
    )
    if named is not None and _iteration(named) is not None:
        states = [p for p in states if _iteration(p) < _iteration(named)]
    candidates = ([named] if named is not None and named.is_file() else []) + states
    skipped = (
        []
        if named is None or named.is_file()
        else [f"{pointer} names {named.name}, which does not exist"]
    )
    for path in candidates:
        try:
            _read_state(path, mmap=True)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped:
            logger.warning(
                "resuming from %s, the newest readable training state: %s", path, "; ".join(skipped)
            )
        return path
    if candidates:
        raise CheckpointError(
            f"{output_dir}: no readable training state ({len(candidates)} unreadable: "
            f"{'; '.join(skipped[-2:])}); delete them to start over"
        )
    return None
