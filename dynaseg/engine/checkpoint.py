"""Weights (safetensors) and resumable training state, written atomically, loaded without pickle code."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dynaseg.modeling.backbone.pretrained import read_state_dict

__all__ = ["atomic_write", "save_weights", "load_weights", "read_metadata", "save_training_state",
           "load_training_state", "find_last_checkpoint", "CheckpointError"]

logger = logging.getLogger("dynaseg.checkpoint")
_LAST = "last_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the mismatch."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Model weights as safetensors; ``metadata`` values are stored JSON-encoded."""
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a safetensors weights file ({} for other formats)."""
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load weights; with ``strict`` any missing, unexpected or wrong-shape key is an error naming them."""
    try:
        state = read_state_dict(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    model = _unwrap(model)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)}→{tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} wrong-shape ({', '.join(wrong[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    if problems and strict:
        raise CheckpointError(f"{path}: weights do not match the model: " + "; ".join(problems))
    if problems:
        logger.warning("%s: partial load: %s", path, "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)


def save_training_state(output_dir: str | Path, iteration: int, state: dict[str, Any]) -> Path:
    """Write ``model_{iteration:07d}.pt`` (tensors, ints, floats, strings only) and point ``last_checkpoint`` at it."""
    output_dir = Path(output_dir)
    path = output_dir / f"model_{iteration:07d}.pt"
    atomic_write(path, lambda tmp: torch.save({"iteration": iteration, **state}, tmp))
    atomic_write(output_dir / _LAST, lambda tmp: Path(tmp).write_text(path.name))
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a training state with ``weights_only=True`` (no arbitrary objects are unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read training state ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete training state in ``output_dir`` (the one ``last_checkpoint`` names)."""
    output_dir = Path(output_dir)
    pointer = output_dir / _LAST
    if pointer.is_file():
        path = output_dir / pointer.read_text().strip()
        if path.is_file():
            return path
    states = sorted(output_dir.glob("model_[0-9]*.pt"))
    return states[-1] if states else None
