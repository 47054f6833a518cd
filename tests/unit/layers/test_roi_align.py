"""RoIAlign: the separable form against torchvision's op, and sampling in float32 under autocast."""

import pytest
import torch
from torchvision.ops import roi_align

from dynaseg.layers.roi_align import roi_align_aligned, roi_align_separable
from dynaseg.modeling.one_stage.blender import pool_bases


def awkward_rois(num_images: int, n: int = 30) -> torch.Tensor:
    """Random boxes on 3 images of 80 × 108 px (feature maps 20 × 27 at scale 1/4), some reaching
    past the borders, plus an empty, an outside, an inverted and a whole-image box."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * 140 - 20
    wh = torch.rand(n, 2, generator=g) * 90
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:4] = torch.tensor(
        [[10.0, 10.0, 10.0, 10.0], [-50.0, -50.0, -30.0, -30.0], [30.0, 30.0, 20.0, 50.0]]
        + [[0.0, 0.0, 108.0, 80.0]]
    )
    image = torch.randint(0, num_images, (n, 1), generator=g).float()
    return torch.cat([image, boxes], 1).double()


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 0])
def test_separable_equals_torchvision(aligned, sampling_ratio):
    features = torch.randn(3, 5, 20, 27, dtype=torch.float64, requires_grad=True)
    rois = awkward_rois(num_images=3)
    kwargs = dict(output_size=7, spatial_scale=0.25, sampling_ratio=sampling_ratio)
    expected = roi_align(features, rois, aligned=aligned, **kwargs)
    got = roi_align_separable(features, rois, aligned=aligned, **kwargs)
    assert expected[1].abs().sum() == 0 and expected[3].abs().sum() > 0  # outside; whole image
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), features)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), features)
    torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=1e-12)


def test_separable_channels_last_float32_and_empty():
    features = torch.randn(2, 4, 20, 27).contiguous(memory_format=torch.channels_last)
    rois = awkward_rois(num_images=2).float()
    kwargs = dict(output_size=14, spatial_scale=0.25, sampling_ratio=1)
    torch.testing.assert_close(
        roi_align_separable(features, rois, **kwargs),
        roi_align(features, rois, aligned=True, **kwargs),
        rtol=0,
        atol=1e-5,
    )
    assert roi_align_separable(features, rois[:0], **kwargs).shape == (0, 4, 14, 14)


@pytest.mark.parametrize("pool", [roi_align_aligned, roi_align_separable])
def test_sampling_runs_in_float32_under_bf16_autocast(pool):
    # In bf16 the box's 300.7 would be 300 and the samples would sit on a 2 px grid.
    features = torch.randn(1, 2, 100, 100).to(torch.bfloat16)
    rois = torch.tensor([[0.0, 260.3, 201.9, 300.7, 251.3]])
    kwargs = dict(output_size=8, spatial_scale=0.25, sampling_ratio=2)
    expected = roi_align(features.float(), rois, aligned=True, **kwargs).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pool(features, rois, **kwargs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_pool_bases_gradients_when_training_on_cpu():
    bases = torch.randn(2, 4, 20, 27, dtype=torch.float64, requires_grad=True)
    rois = awkward_rois(num_images=2)
    pooled = pool_bases(bases, rois, resolution=14, sampling_ratio=1)
    expected = roi_align(bases, rois, 14, spatial_scale=0.25, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(expected)
    (grad,) = torch.autograd.grad((pooled * upstream).sum(), bases)
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), bases)
    torch.testing.assert_close(grad, grad_expected, rtol=0, atol=1e-12)
