"""Normalisation layers chosen by name (an explicit table, not a registry)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["get_norm", "norm_factory"]


def _group_count(channels: int, preferred: int = 32) -> int:
    """32 groups as in the papers, but at least 4 channels per group for narrow (CPU) layers,
    so a 1×1 map (P7 of a small image) still normalises over several values."""
    groups = max(1, min(preferred, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def get_norm(name: str, channels: int) -> nn.Module:
    """A norm layer for ``channels`` feature maps.

    ``SyncBN`` builds plain BatchNorm here; the engine converts it to ``nn.SyncBatchNorm`` when it
    runs under DDP on CUDA (SyncBatchNorm raises on CPU), so single-process runs never crash.
    """
    if name in ("BN", "SyncBN"):
        return nn.BatchNorm2d(channels)
    if name == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if name == "GN":
        return nn.GroupNorm(_group_count(channels), channels)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{name}'; expected one of BN, SyncBN, FrozenBN, GN, none")


def norm_factory(name: str) -> Callable[[int], nn.Module]:
    """``get_norm`` bound to a name, in the ``norm_layer(channels)`` form torchvision expects."""
    get_norm(name, 8)  # validate early
    return lambda channels: get_norm(name, channels)
