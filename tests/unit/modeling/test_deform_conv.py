"""The CPU deformable-convolution path equals torchvision's op (values and gradients)."""

import pytest
import torch
from torchvision.ops import deform_conv2d

from dynaseg.layers.deform_conv import DeformConv2d, deform_conv2d_sampled


@pytest.mark.parametrize("groups", [1, 2])
def test_sampled_path_matches_torchvision_in_float64(groups):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # Offsets of a few pixels, so many taps fall outside the map (zero padding is exercised).
    offset = (torch.randn(2, 2 * groups * 9, 9, 7, dtype=torch.float64) * 3).requires_grad_()
    ours = deform_conv2d_sampled(x, offset, weight, bias, padding=1)
    reference = deform_conv2d(x, offset, weight, bias, padding=1)
    assert torch.allclose(ours, reference, atol=1e-10)
    grads = torch.autograd.grad(ours.sum(), (x, offset, weight, bias))
    expected = torch.autograd.grad(reference.sum(), (x, offset, weight, bias))
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, atol=1e-8)
    assert torch.autograd.gradcheck(
        lambda a, o: deform_conv2d_sampled(a, o, weight, bias), (x[:1], offset[:1])
    )


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    "band_bytes", [1, 3 * 4 * 9 * 7 * 8 * 4, 10**9]
)  # row bands / whole instances / all
def test_banded_inference_path_equals_torchvision(groups, band_bytes):
    """Without gradients the columns are built in bands (of rows, or of instances): same values."""
    torch.manual_seed(1)
    x = torch.randn(5, 4, 9, 7, dtype=torch.float64)
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    offset = torch.randn(5, 2 * groups * 9, 9, 7, dtype=torch.float64) * 3
    with torch.no_grad():
        ours = deform_conv2d_sampled(x, offset, weight, padding=1, band_bytes=band_bytes)
    assert torch.allclose(ours, deform_conv2d(x, offset, weight, padding=1), atol=1e-10)


def test_module_keeps_torchvision_parameters_and_dispatches():
    torch.manual_seed(0)
    ours = DeformConv2d(4, 6, 3, padding=1)
    reference = __import__("torchvision").ops.DeformConv2d(4, 6, 3, padding=1)
    reference.load_state_dict(ours.state_dict())
    x, offset = torch.randn(3, 4, 8, 8), torch.randn(3, 18, 8, 8)
    assert torch.allclose(ours(x, offset), reference(x, offset), atol=1e-5)
    strided = DeformConv2d(4, 6, 3, padding=1, stride=2)  # falls back to torchvision's op
    assert strided(x, torch.randn(3, 18, 4, 4)).shape == (3, 6, 4, 4)


def test_modulated_deform_conv_layout_and_start():
    """DCNv2's 3×3 conv: zero offsets and logits = the plain conv at half weight (σ(0)); an offset
    of Δx = +1 on every tap with modulation ≈ 1 = the plain conv of the input shifted one pixel left
    (channel 2k is Δy, 2k + 1 is Δx of tap k, torchvision's and detectron2's layout)."""
    from torch.nn import functional as F

    from dynaseg.layers.deform_conv import ModulatedDeformConv3x3

    torch.manual_seed(0)
    conv = ModulatedDeformConv3x3(4, 6)
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), 0.5 * F.conv2d(x, conv.weight, padding=1))
        conv.offset.bias[1:18:2] = 1.0  # Δx = +1
        conv.offset.bias[18:] = 30.0  # modulation σ(30) ≈ 1
        shifted = F.pad(x[..., 1:], (0, 1))
        # column 0 differs by construction: there the deformable conv reads x[..., 0], the shifted
        # input's zero padding
        expected = F.conv2d(shifted, conv.weight, padding=1)
        torch.testing.assert_close(conv(x)[..., 1:], expected[..., 1:])
