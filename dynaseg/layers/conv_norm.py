"""The [conv, norm, ReLU] block of the one-stage models' towers (bases, semantic head)."""

from __future__ import annotations

from torch import nn

from dynaseg.layers.norm import get_norm

__all__ = ["conv_norm_relu"]


def conv_norm_relu(
    in_channels: int, out_channels: int, norm: str, kernel_size: int = 3
) -> nn.Sequential:
    """[conv (no bias when normed), norm, ReLU], kaiming-uniform (a=1) initialised."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm == "none"
    )
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, get_norm(norm, out_channels), nn.ReLU(inplace=True))
