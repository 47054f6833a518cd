"""Property-based fuzzing of the train / test transforms and of image decoding (hypothesis): random
samples through the transforms, and corrupted bytes of every supported image format. Helpers:
``fuzzing.py``.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fuzzing import WARNING_FILTERS, fuzz, rect_mask, report_examples

# The test bodies call ``_count`` / ``_check_error``: hypothesis derives a derandomized test's
# examples from a hash of its source, so keeping the bodies as they were keeps the examples.
from fuzzing import check_error as _check_error
from fuzzing import count as _count
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from dynaseg.data.image_io import ImageReadError, read_image
from dynaseg.data.transforms import build_test_transforms, build_train_transforms, resized_shape

pytestmark = WARNING_FILTERS


@pytest.fixture(scope="module", autouse=True)
def _report_examples(request):
    yield from report_examples(request)


# ----------------------------------------------------------------------------- transforms


@st.composite
def transform_samples(draw) -> dict[str, Any]:
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    masks = [m for m in draw(st.lists(rect_mask(h, w), max_size=4)) if m.any()]
    mask = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    image = torch.from_numpy(
        np.random.default_rng(h * 41 + w).integers(0, 256, (3, h, w), dtype=np.uint8)
    )
    return {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(h, w),
        ),
        "masks": tv_tensors.Mask(mask),
        "labels": torch.arange(len(masks), dtype=torch.int64),
        "iscrowd": torch.tensor([draw(st.booleans()) for _ in masks], dtype=torch.bool),
        "sem_seg": tv_tensors.Mask(
            torch.from_numpy(np.random.default_rng(h + w).integers(0, 3, (h, w)).astype(np.uint8))
            * 100
        ),
    }


def _clone(sample: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() for k, v in sample.items()}


def _tight(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@fuzz(300)
@given(
    sample=transform_samples(),
    short=st.lists(st.integers(1, 60), min_size=1, max_size=3).map(tuple),
    max_size=st.sampled_from([0, 1, 7, 40, 100]),
    seed=st.integers(0, 2**31),
)
def test_fuzz_train_transforms(sample, short, max_size, seed):
    h0, w0 = sample["image"].shape[-2:]
    outs = []
    for flip in (0.0, 1.0):
        torch.manual_seed(seed)
        outs.append(build_train_transforms(short, max_size, flip)(_clone(sample)))
    plain, flipped = outs
    h, w = plain["image"].shape[-2:]
    assert (h, w) in {resized_shape(h0, w0, s, max_size) for s in short}
    if max_size > 0:
        assert max(h, w) <= max(max_size, 1)
    for out in outs:
        n = out["boxes"].shape[0]
        assert out["image"].shape == (3, h, w) and out["image"].dtype == torch.uint8
        assert out["masks"].shape == (n, h, w) and out["masks"].dtype == torch.bool
        assert tuple(out["boxes"].canvas_size) == (h, w) and out["sem_seg"].shape == (h, w)
        assert set(out["sem_seg"].unique().tolist()) <= set(sample["sem_seg"].unique().tolist())
        labels = out["labels"].tolist()
        assert labels == sorted(set(labels)) and out["iscrowd"].tolist() == [
            bool(sample["iscrowd"][k]) for k in labels
        ]  # per-instance fields stay aligned
        b = out["boxes"]
        assert bool(((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)).all())
        assert bool(((b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)).all())
        for m, box in zip(out["masks"], b):  # rectangles: the mask fills its box up to a pixel
            assert m.any()
            assert max(abs(x - y) for x, y in zip(_tight(m), box.tolist())) <= 1 + 1e-3
    # flipping is a mirror of the unflipped result
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert torch.equal(flipped["sem_seg"], plain["sem_seg"].flip(-1))
    assert torch.equal(flipped["labels"], plain["labels"])
    mirrored = torch.stack(
        [
            w - plain["boxes"][:, 2],
            plain["boxes"][:, 1],
            w - plain["boxes"][:, 0],
            plain["boxes"][:, 3],
        ],
        dim=1,
    )
    assert torch.allclose(flipped["boxes"].as_subclass(torch.Tensor), mirrored, atol=1e-4)
    _count("train_transforms")


@fuzz(200)
@given(
    sample=transform_samples(), short=st.integers(1, 60), max_size=st.sampled_from([0, 1, 9, 50])
)
def test_fuzz_test_transforms_and_flip_involution(sample, short, max_size):
    h0, w0 = sample["image"].shape[-2:]
    out = build_test_transforms(short, max_size)(_clone(sample))
    h, w = resized_shape(h0, w0, short, max_size)
    n = sample["boxes"].shape[0]
    assert out["image"].shape == (3, h, w) and out["masks"].shape == (n, h, w)
    assert out["sem_seg"].shape == (h, w) and torch.equal(out["labels"], sample["labels"])
    b = out["boxes"]
    assert bool(
        (b >= -1e-4).all() and (b[:, 0::2] <= w + 1e-3).all() and (b[:, 1::2] <= h + 1e-3).all()
    )
    twice = {
        k: F.horizontal_flip(F.horizontal_flip(v))
        if k in ("image", "boxes", "masks", "sem_seg")
        else v
        for k, v in sample.items()
    }
    for k in ("image", "masks", "sem_seg"):
        assert torch.equal(twice[k], sample[k])
    assert torch.allclose(twice["boxes"], sample["boxes"])
    _count("test_transforms")


# ----------------------------------------------------------------------------- image decoding

FORMATS = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


@st.composite
def encoded_images(draw) -> tuple[bytes, tuple[int, int], str]:
    h, w = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(
        st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"] if fmt == "PNG" else ["RGB", "L"])
    )
    rgb = np.random.default_rng(h * 17 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    pil = Image.fromarray(rgb)
    pil = (
        pil.convert(mode)
        if mode != "I;16"
        else Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    )
    buf = io.BytesIO()
    pil.save(buf, fmt)
    return buf.getvalue(), (h, w), fmt


@st.composite
def corruptions(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["none", "truncate", "flip", "splice", "garbage"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(max_size=64)) + data[at + draw(st.integers(0, 64)) :]
    if kind == "garbage":
        return data[: draw(st.integers(0, 16))] + draw(st.binary(max_size=64))
    return data


@fuzz(500)
@given(data=st.data(), encoded=encoded_images())
def test_fuzz_read_image(data, encoded):
    """Corrupt bytes of every supported format: an RGB uint8 tensor or ImageReadError naming the
    file; never another exception or a crash (torchvision's PNG decoder used to segfault here)."""
    raw, (h, w), fmt = encoded
    content = data.draw(corruptions(raw))
    expected = data.draw(st.sampled_from([None, (h, w), (h + 1, w), (w, h)]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{FORMATS[fmt]}"
        path.write_bytes(content)
        try:
            image = read_image(path, expected)
        except ImageReadError as e:
            _check_error(e, str(path))
            assert e.path == str(path) and e.reason
            assert content != raw or expected not in (None, (h, w)), f"intact {fmt} rejected: {e}"
        else:
            assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
            if content == raw:
                assert tuple(image.shape[-2:]) == (h, w)
            if expected is not None:
                assert tuple(image.shape[-2:]) == expected
    _count("read_image")


# ----------------------------------------------------------------------------- regressions


def test_fuzzing_regression_resize_to_one_pixel():
    """torch's uint8 antialiased resize failed an internal assert for a 1x1 output."""
    image = torch.arange(3 * 3 * 3, dtype=torch.uint8).reshape(3, 3, 3) * 9
    sample = {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(3, 3)),
        "masks": tv_tensors.Mask(torch.zeros(0, 3, 3, dtype=torch.bool)),
        "labels": torch.zeros(0),
    }
    out = build_test_transforms(1, 0)(sample)["image"]
    assert isinstance(out, tv_tensors.Image) and out.shape == (3, 1, 1) and out.dtype == torch.uint8
    assert out.flatten().tolist() == [
        int(v + 0.5) for v in image.float().mean((1, 2)).tolist()
    ]  # the mean colour
