"""Multiply-accumulate counting with ``torch.utils.flop_counter.FlopCounterMode``.

FlopCounterMode silently skips ``torchvision::deform_conv2d``; we register its formula here, in one
place. RoIAlign has no formula and counts as 0 (its cost is bilinear sampling, not MACs).
Units: GMAC (FlopCounterMode counts 2 FLOPs per MAC).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["CUSTOM_FLOP_FORMULAS", "deform_conv2d_flop", "count_gmacs", "eval_mode"]

_T = TypeVar("_T")


def deform_conv2d_flop(
    input_shape: Any, weight_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """FLOPs of ``torchvision::deform_conv2d``: 2 · N · C_out · H_out · W_out · (C_in / groups) · k_h · k_w.

    The same count as a plain convolution of these shapes (weight is (C_out, C_in/groups, k_h, k_w));
    the bilinear sampling of the deformed positions is not included.
    """
    c_out, c_in_per_group, k_h, k_w = weight_shape
    n, _, h_out, w_out = out_shape
    return 2 * n * c_out * h_out * w_out * c_in_per_group * k_h * k_w


CUSTOM_FLOP_FORMULAS = {torch.ops.torchvision.deform_conv2d: deform_conv2d_flop}


class eval_mode:
    """Put a module in eval mode (no BN statistics update) and restore every submodule's mode."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        for m, training in self.modes:
            m.training = training


def count_gmacs(fn: Callable[[], _T]) -> tuple[float, _T]:
    """GMAC of one call of ``fn`` (forward only, under no_grad, deform_conv2d formula included),
    and what it returned."""
    with (
        torch.no_grad(),
        FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS) as counter,
    ):
        result = fn()
    return counter.get_total_flops() / 2 / 1e9, result
