"""Data pipeline: image decoding, COCO validation, transforms, dataset, collation, samplers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util
from torchvision import tv_tensors

from dynaseg.data.coco import DatasetError, load_coco_instances
from dynaseg.data.collate import BatchCollator
from dynaseg.data.dataset import InstanceDataset, rasterize_masks
from dynaseg.data.image_io import ImageReadError, read_image
from dynaseg.data.samplers import (
    GroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    build_test_loader,
    build_train_loader,
)
from dynaseg.data.transforms import (
    ResizeShortestEdge,
    build_test_transforms,
    build_train_transforms,
    resized_shape,
)

pytestmark = [  # third-party deprecations that dynaseg.data already silences outside pytest
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"
    ),
]

RED = (255, 0, 0)


# ----------------------------------------------------------------------------- fixtures


def _draw(path: Path, size_hw: tuple[int, int], polygons: list[list[float]], seed: int) -> None:
    """Dark noisy background with the given polygons filled red (lossless PNG unless .jpg)."""
    h, w = size_hw
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for p in polygons:
        draw.polygon([(p[i], p[i + 1]) for i in range(0, len(p), 2)], fill=RED)
    img.save(path)


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann(aid: int, image_id: int, cat: int, bbox: list[float], seg, iscrowd: int = 0) -> dict:
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "segmentation": seg,
        "iscrowd": iscrowd,
    }


def _write_coco(root: Path, images: list[dict], anns: list[dict], cats=None) -> Path:
    cats = cats or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    """6 images (landscape and portrait), polygons + RLE + crowd, one image without annotations."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, anns, aid = [], [], 1
    sizes = [(48, 64), (64, 48), (40, 70), (72, 40), (50, 50), (44, 60)]
    for i, (h, w) in enumerate(sizes):
        image_id = 100 + i
        polys = (
            []
            if i == 4
            else [_rect(4, 6, w // 2, h // 2), _rect(w // 2 + 3, h // 2 + 2, w - 5, h - 4)]
        )
        _draw(img_dir / f"{image_id}.png", (h, w), polys, seed=i)
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for k, p in enumerate(polys):
            bbox = [p[0], p[1], p[2] - p[0], p[5] - p[1]]
            seg: list | dict = [p]
            if k == 1 and i % 2:  # every other second object as compressed RLE
                m = np.zeros((h, w), np.uint8, order="F")
                m[int(p[1]) : int(p[5]), int(p[0]) : int(p[2])] = 1
                rle = mask_util.encode(m)
                seg = {"size": [h, w], "counts": rle["counts"].decode()}
            anns.append(_ann(aid, image_id, 7 if k == 0 else 3, bbox, seg))
            aid += 1
    anns.append(_ann(aid, 100, 3, [0, 0, 10, 10], [_rect(0, 0, 10, 10)], iscrowd=1))
    return _write_coco(tmp_path, images, anns), img_dir


def _single_image(tmp_path: Path, anns: list[dict], size=(40, 50), check_files=True, cats=None):
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    _draw(img_dir / "a.png", size, [], seed=0)
    images = [{"id": 1, "file_name": "a.png", "height": size[0], "width": size[1]}]
    path = _write_coco(tmp_path, images, anns, cats)
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
            _ann(11, 1, 99, [1, 1, 5, 5], [_rect(1, 1, 6, 6)]),
            [],
            r"annotation id=11: unknown category_id 99",
        ),
        (
            _ann(12, 42, 7, [1, 1, 5, 5], [_rect(1, 1, 6, 6)]),
            [],
            r"annotation id=12: image_id 42 is not in",
        ),
        (
            _ann(13, 1, 7, [1, 1, 5, 5], {"size": [10, 10], "counts": "abc"}),
            [],
            r"annotation id=13: RLE size",
        ),
        (
            _ann(14, 1, 7, [1, 1, 5, 5], [_rect(1, 1, 6, 6)]),
            [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}],
            "duplicated image id",
        ),
        (
            _ann(15, 1, 7, [1, 1, 5], [_rect(1, 1, 6, 6)]),
            [],
            r"annotation id=15: 'bbox' must be 4 numbers",
        ),
    ],
)
def test_load_coco_inconsistent(tmp_path: Path, ann, images_extra, message):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    _draw(img_dir / "a.png", (40, 50), [], seed=0)
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}] + images_extra
    path = _write_coco(tmp_path, images, [ann])
    with pytest.raises(DatasetError, match=message) as err:
        load_coco_instances(path, img_dir)
    assert str(err.value).startswith(str(path))


def test_load_coco_clip_and_drop(tmp_path: Path, caplog):
    anns = [
        _ann(1, 1, 7, [-5, 30, 20, 20], [_rect(0, 30, 15, 40)]),  # outside: clipped, kept
        _ann(2, 1, 7, [10, 10, 0, 5], [_rect(10, 10, 11, 15)]),  # zero width: dropped
        _ann(3, 1, 7, [60, 5, 10, 10], [_rect(60, 5, 70, 15)]),  # fully outside: dropped
        _ann(4, 1, 3, [1, 1, 5, 5], []),  # empty polygon list
        _ann(5, 1, 3, [1, 1, 5, 5], [[1, 1, 5, 5]]),  # < 3 points
        _ann(6, 1, 3, [1, 1, 5, 5], [[1, 1, 3, 3, 5, 5]]),  # collinear: zero area
        _ann(7, 1, 3, [1, 1, 5, 5], [[], _rect(1, 1, 6, 6)]),  # one good part left
        _ann(8, 1, 3, [1, 1, 5, 5], {"size": [40, 50], "counts": [2000]}),  # empty RLE
    ]
    with caplog.at_level(logging.INFO, logger="dynaseg.data"):
        _, ds = _single_image(tmp_path, anns)
    kept = ds.records[0].annotations
    assert len(kept) == 2
    assert kept[0].bbox_xyxy == (0.0, 30.0, 15.0, 40.0)
    assert kept[1].segmentation == [_rect(1, 1, 6, 6)]
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
    path = _write_coco(tmp_path, images, [])
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


# ----------------------------------------------------------------------------- dataset


def test_dataset_sample_and_masks(coco):
    ds = InstanceDataset(load_coco_instances(*coco), None, train=True)
    s = ds[1]  # 64x48 portrait, polygon + RLE, no transforms
    assert s.image.shape == (3, 64, 48) and s.image.dtype == torch.uint8
    assert s.original_size == (64, 48) and s.image_id == 101 and s.file_name.endswith("101.png")
    t = s.target
    assert (
        t.image_size == (64, 48) and t.labels.tolist() == [1, 0] and t.boxes.dtype == torch.float32
    )
    assert t.masks.shape == (2, 64, 48) and t.masks.dtype == torch.bool
    for m, b in zip(t.masks, t.boxes):
        assert (torch.tensor(_mask_box(m), dtype=torch.float32) - b).abs().max() <= 1
    assert (s.image[0][t.masks.any(0)] == 255).float().mean() > 0.9
    assert len(ds[0].target) == 2  # crowd annotation excluded
    empty = ds[4]
    assert len(empty.target) == 0 and empty.target.masks.shape == (0, 50, 50)
    assert empty.target.boxes.shape == (0, 4)


def test_dataset_empty_image_after_transforms(coco):
    ds = InstanceDataset(
        load_coco_instances(*coco), build_train_transforms((32, 40), 90, 0.5), train=True
    )
    s = ds[4]
    h, w = s.image.shape[-2:]
    assert s.target.masks.shape == (0, h, w) and s.target.image_size == (h, w)


def test_dataset_max_instances_keeps_largest(coco):
    ds = InstanceDataset(load_coco_instances(*coco), None, train=True, max_instances=1)
    t = ds[0].target  # 48x64: first rect 28x18=504, second 24x20=480
    assert len(t) == 1 and t.boxes[0].tolist() == [4.0, 6.0, 32.0, 24.0]
    assert (
        len(
            InstanceDataset(load_coco_instances(*coco), None, train=False, max_instances=1)[
                0
            ].target
        )
        == 2
    )


def test_dataset_reproducible_augmentation(coco):
    inst = load_coco_instances(*coco)
    tf = build_train_transforms((24, 32, 40, 48, 56), 200, 0.5)
    a, b = (
        InstanceDataset(inst, tf, train=True, seed=3),
        InstanceDataset(inst, tf, train=True, seed=3),
    )
    torch.manual_seed(123)  # global RNG state must not matter ...
    first = [a[i].image for i in range(12)]
    rng_after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), rng_after)  # ... and must not be consumed
    second = [b[i].image for i in reversed(range(12))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # epoch encoding == set_epoch; different epochs augment differently
    b.set_epoch(1)
    assert torch.equal(a[len(a) + 2].image, b[2].image)
    assert any(not (x.shape == y.shape and torch.equal(x, y)) for x, y in zip(first[:6], first[6:]))


def test_dataset_image_cache(coco, monkeypatch: pytest.MonkeyPatch):
    """Cached images are decoded once, up to the byte limit, and augment as decoded ones do."""
    import dynaseg.data.dataset as dataset_module

    inst = load_coco_instances(*coco)
    tf = build_train_transforms((24, 40, 56), 200, 0.5)
    reads: list[str] = []
    read = dataset_module.read_image
    monkeypatch.setattr(
        dataset_module, "read_image", lambda path, size: reads.append(path) or read(path, size)
    )
    records = inst.records
    room = sum(3 * r.height * r.width for r in records[:2])  # the first two, not the third
    plain = InstanceDataset(inst, tf, train=True, seed=3)
    cached = InstanceDataset(inst, tf, train=True, seed=3, image_cache_bytes=room)
    n = len(records)
    expected = [plain[k] for k in range(3 * n)]  # three epochs
    reads.clear()
    got = [cached[k] for k in range(3 * n)]
    for x, y in zip(expected, got):  # an in-place transform would change epochs 2 and 3
        assert torch.equal(x.image, y.image)
        assert torch.equal(x.target.masks, y.target.masks)
    names = [r.file_name for r in records]
    assert reads == names + names[2:] + names[2:]
    with pytest.raises(ValueError, match="image_cache_bytes must be >= 0"):
        InstanceDataset(inst, tf, train=True, image_cache_bytes=-1)


def test_dataset_read_error_propagates(coco, tmp_path: Path):
    inst = load_coco_instances(*coco)
    Path(inst.records[2].file_name).write_bytes(b"garbage")
    ds = InstanceDataset(inst, None, train=True)
    with pytest.raises(ImageReadError, match="102.png"):
        ds[2]
    it = iter(build_test_loader(ds, batch_size=3, num_workers=1))
    with pytest.raises(
        ImageReadError, match=r"102\.png: cannot read image"
    ):  # type survives workers
        next(it)
    # The re-raised exception's traceback holds the iterator in a reference cycle; finalised by the
    # GC it waits 5 s for its worker, so shut it down explicitly.
    it._shutdown_workers()


def test_rasterize_uncompressed_rle():
    from dynaseg.data.coco import AnnotationRecord

    rle = {"size": [4, 5], "counts": [5, 3, 12]}  # column-major: column 1, rows 1..3
    m = rasterize_masks([AnnotationRecord(0, (1, 1, 2, 4), rle, False)], 4, 5)
    assert m.shape == (1, 4, 5) and m.sum() == 3 and m[0, 1:4, 1].all()


# ----------------------------------------------------------------------------- collate


def test_collate_padding(coco):
    ds = InstanceDataset(load_coco_instances(*coco), None, train=False)
    batch = BatchCollator(size_divisibility=32)([ds[0], ds[1], ds[2]])
    assert batch.images.shape == (3, 3, 64, 96) and batch.images.dtype == torch.float32
    assert batch.image_sizes == [(48, 64), (64, 48), (40, 70)]
    assert batch.original_sizes == batch.image_sizes and batch.image_ids == [100, 101, 102]
    assert torch.equal(batch.images[1, :, :64, :48], ds[1].image.float())
    assert batch.images[1, :, 64:].abs().sum() == 0 and batch.images[1, :, :, 48:].abs().sum() == 0
    assert [t.masks.shape[-2:] for t in batch.targets] == [(48, 64), (64, 48), (40, 70)]
    assert BatchCollator(0)([ds[2]]).images.shape == (1, 3, 40, 70)


# ----------------------------------------------------------------------------- samplers


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_training_sampler_sharding_and_determinism():
    n, ws = 10, 3
    streams = [_take(iter(TrainingSampler(n, seed=5, rank=r, world_size=ws)), 8) for r in range(ws)]
    assert streams[0] == _take(iter(TrainingSampler(n, seed=5, rank=0, world_size=ws)), 8)
    assert streams[0] != _take(iter(TrainingSampler(n, seed=6, rank=0, world_size=ws)), 8)
    per_rank = 4  # ceil(10 / 3), padded to 12
    epoch0 = [i for s in streams for i in s[:per_rank]]
    assert set(epoch0) == set(range(n)) and len(epoch0) == 12
    epoch1 = [i for s in streams for i in s[per_rank:]]
    assert all(n <= i < 2 * n for i in epoch1) and set(epoch1) == set(range(n, 2 * n))
    # divisible case: exactly disjoint
    parts = [TrainingSampler(12, seed=1, rank=r, world_size=4).epoch_indices(0) for r in range(4)]
    assert sorted(sum(parts, [])) == list(range(12))
    full = _take(iter(TrainingSampler(n, seed=5, rank=1, world_size=ws)), 20)
    assert _take(iter(TrainingSampler(n, seed=5, rank=1, world_size=ws, skip=7)), 13) == full[7:]


def test_grouped_batch_sampler_groups():
    groups = [0, 1, 0, 1, 1, 0, 0]
    batches = _take(iter(GroupedBatchSampler(TrainingSampler(7, seed=0), groups, 3)), 10)
    for b in batches:
        assert len(b) == 3 and len({groups[i % 7] for i in b}) == 1
    resumed = _take(
        iter(GroupedBatchSampler(TrainingSampler(7, seed=0), groups, 3, skip_batches=4)), 6
    )
    assert resumed == batches[4:]


def test_inference_sampler():
    shards = [list(InferenceSampler(10, rank=r, world_size=4)) for r in range(4)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(InferenceSampler(2, rank=r, world_size=4)) for r in range(4)] == [1, 1, 0, 0]


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("grouping", [True, False])
def test_train_loader_resume(coco, grouping):
    ds = InstanceDataset(
        load_coco_instances(*coco),
        build_train_transforms((24, 32, 40), 80, 0.5),
        train=True,
        seed=1,
    )
    kw = dict(
        batch_size_per_rank=2,
        num_workers=0,
        aspect_ratio_grouping=grouping,
        seed=4,
        size_divisibility=16,
    )
    fresh = _batches(build_train_loader(ds, **kw), 9)
    resumed = _batches(build_train_loader(ds, start_iter=5, **kw), 4)
    for a, b in zip(fresh[5:], resumed):
        assert a.image_ids == b.image_ids and a.image_sizes == b.image_sizes
        assert torch.equal(a.images, b.images)
        assert all(
            torch.equal(x.masks, y.masks) and torch.equal(x.boxes, y.boxes)
            for x, y in zip(a.targets, b.targets)
        )
    for b in fresh:
        assert b.images.shape[-1] % 16 == 0 and b.images.shape[-2] % 16 == 0
        if grouping:
            assert len({h > w for h, w in b.original_sizes}) == 1
    assert len({tuple(b.image_ids) for b in fresh}) > 1


def test_train_loader_workers_match_main_process(coco):
    ds = InstanceDataset(
        load_coco_instances(*coco),
        build_train_transforms((24, 32, 40), 80, 0.5),
        train=True,
        seed=2,
    )
    kw = dict(batch_size_per_rank=2, aspect_ratio_grouping=True, seed=0, rank=1, world_size=2)
    main = _batches(build_train_loader(ds, num_workers=0, **kw), 5)
    workers = _batches(build_train_loader(ds, num_workers=2, **kw), 5)
    for a, b in zip(main, workers):
        assert a.image_ids == b.image_ids and torch.equal(a.images, b.images)


def test_test_loader(coco):
    ds = InstanceDataset(load_coco_instances(*coco), build_test_transforms(32, 60), train=False)
    ids = []
    for rank in range(2):
        for batch in build_test_loader(
            ds, batch_size=2, rank=rank, world_size=2, size_divisibility=8
        ):
            ids += batch.image_ids
            for (h, w), (oh, ow) in zip(batch.image_sizes, batch.original_sizes):
                assert (h, w) == resized_shape(oh, ow, 32, 60)
    assert ids == list(range(100, 106))


@pytest.mark.parametrize("key", ["num_workers", "image_cache_gb"])
def test_build_dataset_refuses_negative_loader_settings(coco, key: str):
    from dynaseg.config.overrides import ConfigError
    from dynaseg.config.presets import load_config
    from dynaseg.data.build import build_dataset

    cfg = load_config("blendmask_tiny", [f"data.{key}=-1"])
    with pytest.raises(ConfigError, match=rf"data\.{key}: must be >= 0, got -1"):
        build_dataset(cfg, load_coco_instances(*coco), train=True)


def test_build_dataset_refuses_empty_split(tmp_path: Path):
    from dynaseg.config.presets import load_config
    from dynaseg.data.build import build_dataset

    path = _write_coco(tmp_path, [], [])
    data = load_coco_instances(path, tmp_path)
    cfg = load_config("blendmask_tiny", [])
    for train, what in ((True, "train"), (False, "evaluate")):
        with pytest.raises(
            DatasetError, match=rf"ann\.json: 'images' is empty, nothing to {what} on"
        ):
            build_dataset(cfg, data, train=train)
