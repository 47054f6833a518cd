"""Load backbone weights from a local torchvision-style ResNet checkpoint file."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = ["load_backbone_weights", "read_state_dict"]

logger = logging.getLogger("dynaseg.checkpoint")
_PREFIXES = ("module.", "backbone.body.", "backbone.bottom_up.", "backbone.", "body.")
_IGNORED = ("fc.",)  # the ImageNet classifier


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d state dict (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses pickled code without running it
        raise ValueError(
            f"{path}: cannot read checkpoint (it holds pickled objects other than tensors and plain "
            "values; refused without running them)"
        ) from None
    except Exception as e:  # corrupt / truncated
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Copy matching tensors into ``backbone``; shape mismatches and missing keys are errors.

    Accepts torchvision ResNet checkpoints (``fc.*`` ignored) and checkpoints whose keys carry a
    ``module.`` / ``backbone.`` prefix.
    """
    state = {_strip(k): v for k, v in read_state_dict(path).items()}
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith(_IGNORED) and not k.endswith("num_batches_tracked")
    }
    own = backbone.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"{path}: {len(wrong)} backbone tensors have the wrong shape, e.g. {wrong[0]}"
        )
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} backbone tensors are missing from the checkpoint, e.g. {missing[:3]}"
        )
    backbone.load_state_dict(state, strict=False)
    logger.info(
        "loaded %d backbone tensors from %s (%d unused keys)",
        len(state) - len(unexpected),
        path,
        len(unexpected),
    )
