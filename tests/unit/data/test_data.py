"""Data pipeline, reading: image decoding, COCO validation, transforms."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from coco_cases import coco_annotation, draw_image, rect, write_coco
from PIL import Image
from torchvision import tv_tensors

from dynaseg.data.coco import DatasetError, load_coco_instances
from dynaseg.data.image_io import ImageReadError, read_image
from dynaseg.data.transforms import (
    ResizeShortestEdge,
    build_test_transforms,
    build_train_transforms,
    resized_shape,
)


def _single_image(tmp_path: Path, anns: list[dict], size=(40, 50), check_files=True, cats=None):
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    draw_image(img_dir / "a.png", size, [], seed=0)
    images = [{"id": 1, "file_name": "a.png", "height": size[0], "width": size[1]}]
    path = write_coco(tmp_path, images, anns, cats)
    return path, load_coco_instances(path, img_dir, check_files=check_files)


def _mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ----------------------------------------------------------------------------- image_io


def test_read_image_modes(tmp_path: Path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")  # not decodable by torchvision: Pillow fallback

    expect_gray = torch.from_numpy(gray).expand(3, -1, -1)
    for name in ("gray.png", "la.png", "g16.png"):
        img = read_image(tmp_path / name)
        assert img.shape == (3, 20, 30) and img.dtype == torch.uint8, name
        assert torch.equal(img, expect_gray), name  # 16-bit: 257*k -> k exactly
    assert torch.equal(read_image(tmp_path / "rgba.png"), torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(read_image(tmp_path / "rgb.bmp"), torch.from_numpy(rgb).permute(2, 0, 1))
    ref = torch.from_numpy(rgb).permute(2, 0, 1).float()
    pal, cmyk = read_image(tmp_path / "pal.png"), read_image(tmp_path / "cmyk.jpg")
    assert pal.shape == cmyk.shape == (3, 20, 30)
    assert (pal - ref).abs().mean() < 40 and (cmyk - ref).abs().mean() < 25  # quantised / lossy


def test_read_image_errors(tmp_path: Path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"definitely not an image")
    cases = {
        "missing.jpg": "file not found",
        "trunc.jpg": "truncated JPEG",
        "junk.jpg": "not a recognised image format",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageReadError) as err:
            read_image(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: cannot read image ({reason})"
        assert isinstance(err.value, OSError)
    with pytest.raises(ImageReadError, match=r"ok\.jpg.*decoded size 20x30 .* 30x20.*swapped"):
        read_image(tmp_path / "ok.jpg", expected_size=(30, 20))
    assert read_image(tmp_path / "ok.jpg", expected_size=(20, 30)).shape == (3, 20, 30)


def test_read_image_applies_exif_orientation(tmp_path: Path):
    img = Image.fromarray(np.zeros((20, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (3, 30, 20)


# ----------------------------------------------------------------------------- coco loading


def test_load_coco_valid(coco):
    json_path, img_dir = coco
    ds = load_coco_instances(json_path, img_dir)
    assert ds.category_ids == [3, 7] and ds.class_names == ["dog", "cat"]
    assert [r.image_id for r in ds.records] == list(range(100, 106))
    assert ds.records[0].file_name == str((img_dir / "100.png").resolve())
    assert ds.records[4].annotations == ()  # kept as a negative
    assert ds.stats["images_without_annotations"] == 1
    assert ds.stats["crowd_annotations"] == 1 and ds.records[0].annotations[-1].iscrowd
    assert ds.records[0].annotations[0].category == 1  # COCO id 7 -> contiguous 1
    assert ds.records[1].annotations[0].bbox_xyxy == (4.0, 6.0, 24.0, 32.0)
    assert isinstance(ds.records[1].annotations[1].segmentation, dict)
    assert all(v == 0 for k, v in ds.stats.items() if k.startswith("dropped"))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "annotation file not found"),
        ("{not json", "not valid JSON"),
        ('{"images": [], "categories": []}', "missing top-level key"),
        ("[1, 2]", "top level must be a JSON object"),
    ],
)
def test_load_coco_bad_file(tmp_path: Path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        load_coco_instances(path, tmp_path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize(
    "ann, images_extra, message",
    [
        (
            coco_annotation(11, 1, 99, [1, 1, 5, 5], [rect(1, 1, 6, 6)]),
            [],
            r"annotation id=11: unknown category_id 99",
        ),
        (
            coco_annotation(12, 42, 7, [1, 1, 5, 5], [rect(1, 1, 6, 6)]),
            [],
            r"annotation id=12: image_id 42 is not in",
        ),
        (
            coco_annotation(13, 1, 7, [1, 1, 5, 5], {"size": [10, 10], "counts": "abc"}),
            [],
            r"annotation id=13: RLE size",
        ),
        (
            coco_annotation(14, 1, 7, [1, 1, 5, 5], [rect(1, 1, 6, 6)]),
            [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}],
            "duplicated image id",
        ),
        (
            coco_annotation(15, 1, 7, [1, 1, 5], [rect(1, 1, 6, 6)]),
            [],
            r"annotation id=15: 'bbox' must be 4 numbers",
        ),
    ],
)
def test_load_coco_inconsistent(tmp_path: Path, ann, images_extra, message):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    draw_image(img_dir / "a.png", (40, 50), [], seed=0)
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}] + images_extra
    path = write_coco(tmp_path, images, [ann])
    with pytest.raises(DatasetError, match=message) as err:
        load_coco_instances(path, img_dir)
    assert str(err.value).startswith(str(path))


def test_load_coco_clip_and_drop(tmp_path: Path, caplog):
    anns = [
        coco_annotation(1, 1, 7, [-5, 30, 20, 20], [rect(0, 30, 15, 40)]),  # outside: clipped, kept
        coco_annotation(2, 1, 7, [10, 10, 0, 5], [rect(10, 10, 11, 15)]),  # zero width: dropped
        coco_annotation(3, 1, 7, [60, 5, 10, 10], [rect(60, 5, 70, 15)]),  # fully outside: dropped
        coco_annotation(4, 1, 3, [1, 1, 5, 5], []),  # empty polygon list
        coco_annotation(5, 1, 3, [1, 1, 5, 5], [[1, 1, 5, 5]]),  # < 3 points
        coco_annotation(6, 1, 3, [1, 1, 5, 5], [[1, 1, 3, 3, 5, 5]]),  # collinear: zero area
        coco_annotation(7, 1, 3, [1, 1, 5, 5], [[], rect(1, 1, 6, 6)]),  # one good part left
        coco_annotation(8, 1, 3, [1, 1, 5, 5], {"size": [40, 50], "counts": [2000]}),  # empty RLE
    ]
    with caplog.at_level(logging.INFO, logger="dynaseg.data"):
        _, ds = _single_image(tmp_path, anns)
    kept = ds.records[0].annotations
    assert len(kept) == 2
    assert kept[0].bbox_xyxy == (0.0, 30.0, 15.0, 40.0)
    assert kept[1].segmentation == [rect(1, 1, 6, 6)]
    s = ds.stats
    assert (
        s["clipped_bbox"],
        s["dropped_degenerate_bbox"],
        s["dropped_no_valid_polygon"],
        s["dropped_polygon_parts"],
        s["dropped_empty_rle"],
    ) == (1, 2, 3, 3, 1)
    text = caplog.text
    for key in (
        "clipped_bbox",
        "dropped_degenerate_bbox",
        "dropped_no_valid_polygon",
        "dropped_polygon_parts",
        "dropped_empty_rle",
    ):
        assert f"[{key}]" in text and "ann.json" in text
    assert (
        sum(f"[{k}]" in text for k in ("dropped_nonfinite_bbox", "dropped_missing_segmentation"))
        == 0
    )


def test_load_coco_missing_images(tmp_path: Path):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    images = [{"id": i, "file_name": f"{i}.png", "height": 10, "width": 10} for i in range(8)]
    path = write_coco(tmp_path, images, [])
    with pytest.raises(
        DatasetError, match=r"ann\.json: 8 of 8 images are missing.*0\.png.*, \.\.\."
    ):
        load_coco_instances(path, img_dir)
    assert len(load_coco_instances(path, img_dir, check_files=False).records) == 8


# ----------------------------------------------------------------------------- transforms


def _sample(h=48, w=64):
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[0, 6:24, 4:32] = True
    mask[1, 30:44, 40:59] = True
    boxes = torch.tensor([[4, 6, 32, 24], [40, 30, 59, 44]], dtype=torch.float32)
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[0][mask.any(0)] = 255
    return {
        "image": tv_tensors.Image(image),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(mask),
        "labels": torch.tensor([0, 1]),
        "iscrowd": torch.tensor([False, True]),
    }


@pytest.mark.parametrize("short", [30, 48, 75, 101])
def test_train_transforms_consistent(short):
    plain = build_train_transforms((short,), 1000, hflip_prob=0.0)(_sample())
    flipped = build_train_transforms((short,), 1000, hflip_prob=1.0)(_sample())
    h, w = resized_shape(48, 64, short, 1000)
    for out in (plain, flipped):
        assert out["image"].shape == (3, h, w) and out["masks"].shape == (2, h, w)
        assert out["masks"].dtype == torch.bool and out["boxes"].canvas_size == (h, w)
        for m, b in zip(out["masks"], out["boxes"]):
            assert (torch.tensor(_mask_box(m), dtype=torch.float32) - b).abs().max() <= 2
        # the red object pixels coincide with the masks
        red = out["image"][0] > 127
        assert (red ^ out["masks"].any(0)).float().mean() < 0.03
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    for key in ("labels", "iscrowd"):
        assert torch.equal(flipped[key], plain[key])


def test_train_transforms_sanitize_keeps_alignment():
    sample = _sample()
    sample["boxes"][0] = torch.tensor([10, 10, 10.5, 20])  # < 1 px wide: removed with its fields
    out = build_train_transforms((48,), 1000, 0.0)(sample)
    assert out["boxes"].shape == (1, 4) and out["masks"].shape[0] == 1
    assert out["labels"].tolist() == [1] and out["iscrowd"].tolist() == [True]


def test_resize_shortest_edge_sizes():
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)  # long side capped
    assert resized_shape(640, 480, 800, 0) == (1067, 800)
    out = build_test_transforms(800, 1333)(_sample(480, 640))
    assert out["image"].shape[-2:] == (800, 1067) and out["masks"].shape[-2:] == (800, 1067)
    torch.manual_seed(0)
    seen = {
        tuple(ResizeShortestEdge((20, 30, 40), 100)(_sample())["image"].shape[-2:])
        for _ in range(40)
    }
    assert seen == {resized_shape(48, 64, s, 100) for s in (20, 30, 40)}
