"""Backbone weights: torchvision's ImageNet ResNets through its weights API, or a local file."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn

from dynaseg.errors import UserError

__all__ = [
    "WeightsError",
    "load_backbone_weights",
    "read_state_dict",
    "resolve_weights_file",
    "cached_torchvision_weights",
    "TORCHVISION_PREFIX",
]

logger = logging.getLogger("dynaseg.checkpoint")
_PREFIXES = ("module.", "backbone.body.", "backbone.bottom_up.", "backbone.", "body.")
_IGNORED = ("fc.",)  # the ImageNet classifier


class WeightsError(UserError, ValueError):
    """A weights file or name that cannot be used; the message names it and the problem."""


TORCHVISION_PREFIX = "torchvision:"


def resolve_weights_file(spec: str) -> Path:
    """A weights argument → the local file it names.

    ``torchvision:resnet50`` (ImageNet ``IMAGENET1K_V1``, the weights torchvision's detection models
    start from) or ``torchvision:resnet50.IMAGENET1K_V2`` (any member of torchvision's weights enum
    for that architecture) is looked up in torch's cache (``$TORCH_HOME/hub/checkpoints``, by the
    file name of the enum's URL) and downloaded there by ``torch.hub`` when missing. Anything else is
    a local ``.pth`` / ``.safetensors`` path. Offline with an empty cache: a ``WeightsError`` saying
    what to download and where to put it.
    """
    if not spec.startswith(TORCHVISION_PREFIX):
        return Path(spec)
    return cached_torchvision_weights(_torchvision_weights(spec), spec)


def cached_torchvision_weights(weights, spec: str) -> Path:
    """The file of a torchvision weights enum member in torch's cache, downloaded when missing."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if cached.is_file():
        return cached
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except (URLError, OSError, RuntimeError) as e:
        reason = str(getattr(e, "reason", e)).splitlines()[0][:200]
        raise WeightsError(
            f"{spec}: not in torch's cache and the download failed ({reason}); download "
            f"{weights.url} and put it at {cached} (the cache folder is $TORCH_HOME/hub/checkpoints)"
        ) from None
    return cached


def _torchvision_weights(spec: str):
    """``torchvision:resnet50[.VARIANT]`` → the torchvision weights enum member."""
    from torchvision.models import get_model_weights, list_models

    name, _, variant = spec[len(TORCHVISION_PREFIX) :].partition(".")
    resnets = sorted(m for m in list_models() if m.startswith("resnet"))
    if name not in resnets:
        raise WeightsError(
            f"{spec}: unknown torchvision backbone '{name}'; choose from {', '.join(resnets)}"
        )
    enum = get_model_weights(name)
    variant = variant or "IMAGENET1K_V1"
    if variant not in enum.__members__:
        raise WeightsError(
            f"{spec}: {name} has weights {', '.join(enum.__members__)}, not '{variant}'"
        )
    return enum[variant]


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
        raise WeightsError(
            f"{path}: cannot read checkpoint (it holds pickled objects other than tensors and plain "
            "values; refused without running them)"
        ) from None
    except Exception as e:  # corrupt / truncated
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise WeightsError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {first})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def load_backbone_weights(backbone: nn.Module, spec: str | Path) -> None:
    """Copy matching tensors into ``backbone``; shape mismatches and missing keys are errors.

    spec: ``torchvision:resnet50[.VARIANT]`` or a local file (``resolve_weights_file``). Accepts
    torchvision ResNet checkpoints (``fc.*`` ignored) and checkpoints whose keys carry a
    ``module.`` / ``backbone.`` prefix.
    """
    path = resolve_weights_file(str(spec))
    name = str(path) if str(spec) == str(path) else f"{spec} ({path})"
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
        raise WeightsError(
            f"{name}: {len(wrong)} backbone tensors have the wrong shape, e.g. {wrong[0]}"
        )
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise WeightsError(
            f"{name}: {len(missing)} backbone tensors are missing from the checkpoint, e.g. {missing[:3]}"
        )
    backbone.load_state_dict(state, strict=False)
    logger.info(
        "loaded %d backbone tensors from %s (%d unused keys)",
        len(state) - len(unexpected),
        path,
        len(unexpected),
    )
