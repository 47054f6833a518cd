"""DynaMask's Mask Switch Module (MSM, paper §3.2, Fig. 4) and its resolution selection.

The MSM is a small classifier on an instance's RoI feature that scores K candidate mask resolutions
(14/28/56/112 in the paper). In training a Gumbel-softmax sample (Eq. 2) picks one, with a
straight-through gradient; at inference the choice is the noise-free argmax of the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynaseg.layers.norm import get_norm

__all__ = ["MaskSwitchModule", "gumbel_softmax_select", "select_resolution"]


class _SqueezeExcitation(nn.Module):
    """SE block (Hu et al., the paper's [13]): x · σ(W2 ReLU(W1 avgpool(x))), per channel."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))  # (N, C)
        return x * scale[:, :, None, None]


def _conv_block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """3×3 conv → norm → ReLU → 3×3/2 max-pool (halves the side, rounding up)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none")
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return nn.Sequential(
        conv,
        get_norm(norm, out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


class MaskSwitchModule(nn.Module):
    """f_MSM: an SE block, two conv layers and two fully connected layers → K resolution logits.

    Paper Fig. 4: "a CNN-based classifier and consists of a SE-block [13], two convolutional layers
    and two fully-connected layers". Each conv block is 3×3 conv, norm, ReLU and a stride-2 max-pool
    (14 → 7 → 4); the layer widths are not given in the paper and are arguments here. The softmax of
    the logits is P of Eq. 1; the last layer is initialised near zero so P starts near uniform.

    Args:
        in_channels: RoI feature width C.
        num_choices: K candidate resolutions, ordered from the smallest (paper: 4).
        conv_channels: width of both conv layers. fc_channels: width of the hidden FC layer.
        norm: norm after each conv (``get_norm`` name).
        input_size: side s of the RoI feature (14 in the paper's mask branch).
        se_reduction: SE bottleneck ratio (16 as in the SE paper).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_choices: int = 4,
        conv_channels: int = 128,
        fc_channels: int = 512,
        norm: str = "BN",
        input_size: int = 14,
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        self.se = _SqueezeExcitation(in_channels, se_reduction)
        self.convs = nn.Sequential(
            _conv_block(in_channels, conv_channels, norm),
            _conv_block(conv_channels, conv_channels, norm),
        )
        side = (input_size + 1) // 2
        side = (side + 1) // 2
        self.fc1 = nn.Linear(conv_channels * side * side, fc_channels)
        self.fc2 = nn.Linear(fc_channels, num_choices)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, roi_features: Tensor) -> Tensor:
        """roi_features: (N, C, s, s) → logits f_MSM(x): (N, K), resolution k in ascending order."""
        x = self.convs(self.se(roi_features)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def gumbel_softmax_select(
    logits: Tensor, *, tau: float, hard: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Gumbel-softmax sample Y of the MSM distribution (paper Eq. 2).

    ``y^k = softmax_k((log p^k + g^k) / τ)`` with ``p = softmax(logits)`` (Eq. 1) and i.i.d. Gumbel(0, 1)
    noise ``g = -log(-log(u))``, ``u ~ Uniform(0, 1)`` drawn from ``generator``. Since
    ``log p^k = logits^k - logsumexp(logits)``, this equals ``softmax((logits + g) / τ)``.
    With ``hard=True`` the forward value is the exact one-hot of the argmax (the Gumbel-max sample
    ``one_hot(argmax_k(log p^k + g^k))``) and the backward pass is the soft sample's gradient
    (straight-through estimator).

    logits: (N, K) → (N, K), rows summing to 1, same dtype and device.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
    soft = ((torch.log_softmax(logits, dim=-1) + gumbel) / tau).softmax(dim=-1)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return one_hot + (soft - soft.detach())  # value: exactly one_hot; gradient: d soft


def select_resolution(logits: Tensor) -> Tensor:
    """Inference-time switching state: argmax_k p^k = argmax_k logits^k, no noise. (N, K) → (N,) int64."""
    return logits.argmax(dim=-1)
