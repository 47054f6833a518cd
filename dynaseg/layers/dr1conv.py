"""Dynamic rank-1 convolution (DR1Conv, DR1Mask paper §3.1, Eq. 2-4).

Y = DR1Conv_{A,B}(X) = Conv_W(X ∘ A) ∘ B: a static convolution W with position-dependent factors
multiplied element-wise before (A, one per input channel and pixel) and after (B, one per output
channel and pixel). For a 1×1 kernel this is, at every pixel p, the static matrix modulated by the
rank-1 matrix b_p a_pᵀ (Eq. 2): y_p = (W ∘ b_p a_pᵀ) x_p.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["DR1Conv2d"]


class DR1Conv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` whose forward takes the two dynamic factors.

    With A = B = 1 it is exactly the plain convolution (factors that start at 1 make a new DR1Conv
    start as its static conv). Either factor may be None (the ablation of paper Table 1).

    Args: as ``nn.Conv2d`` (no bias: B would scale it per pixel); padding defaults to "same" for odd
    kernels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        nn.init.kaiming_uniform_(self.weight, a=1)

    def forward(self, x: Tensor, pre: Tensor | None = None, post: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """x: (B, C_in, H, W); pre A: (B, C_in, H, W); post B: (B, C_out, H_out, W_out) → (B, C_out, H_out, W_out)."""
        if pre is not None:
            x = x * pre
        y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return y if post is None else y * post
