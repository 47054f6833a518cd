"""Panoptic data: COCO panoptic loading/validation, PanopticDataset targets, sem_seg transforms, collation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from dynaseg.data.coco import DatasetError
from dynaseg.data.coco_panoptic import load_coco_panoptic
from dynaseg.data.collate import BatchCollator
from dynaseg.data.dataset import Sample
from dynaseg.data.image_io import ImageReadError
from dynaseg.data.panoptic_dataset import PanopticDataset
from dynaseg.data.synthetic import STUFF_CLASSES, THING_CLASSES, generate_synthetic
from dynaseg.data.transforms import SanitizeInstances, build_train_transforms, resized_shape
from dynaseg.structures.panoptic import IGNORE_LABEL, id_to_rgb, rgb_to_id

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict[str, Path]:
    """Synthetic panoptic train split: 6 images of 64x96, up to 5 things, sky/ground stuff."""
    out = tmp_path_factory.mktemp("synth_panoptic")
    return generate_synthetic(
        out, num_train=6, num_val=0, image_size=(64, 96), seed=5, max_objects=5
    )


def _load_synth(paths: dict[str, Path], **kw):
    return load_coco_panoptic(
        paths["panoptic_train_json"], paths["train_images"], paths["panoptic_train_dir"], **kw
    )


# Hand-made dataset. Categories listed out of order: things dog(1)->0, cat(3)->1; stuff sky(10)->0,
# grass(20)->1.
CATEGORIES = [
    {"id": 20, "name": "grass", "isthing": 0},
    {"id": 3, "name": "cat", "isthing": 1},
    {"id": 10, "name": "sky", "isthing": 0},
    {"id": 1, "name": "dog", "isthing": 1},
]


def _image_a() -> tuple[np.ndarray, list[dict], np.ndarray, list[tuple[int, int, list[int]]]]:
    """20x30 ids, segments_info, expected sem_seg and expected (label, id, box) of the instances."""
    ids = np.zeros((20, 30), np.int64)
    ids[:10] = 5  # sky
    ids[10:] = 6  # grass
    ids[2:7, 3:11] = 300  # cat, 5x8 = 40 px (id needs G)
    ids[12:19, 15:28] = 70000  # dog, 7x13 = 91 px (id needs B)
    ids[0:4, 20:30] = 8  # crowd dog
    ids[5:9, 24:30] = 9  # crowd grass
    ids[15:20, 0:5] = 0  # void
    segs = [
        {"id": 5, "category_id": 10, "iscrowd": 0},
        {"id": 6, "category_id": 20},
        {"id": 300, "category_id": 3, "iscrowd": 0, "bbox": [3, 2, 8, 5]},
        {"id": 70000, "category_id": 1, "iscrowd": 0},
        {"id": 8, "category_id": 1, "iscrowd": 1},
        {"id": 9, "category_id": 20, "iscrowd": 1},
    ]
    sem = np.full((20, 30), IGNORE_LABEL, np.int64)
    sem[ids == 5] = 0
    sem[ids == 6] = 1
    things = [(1, 300, [3, 2, 11, 7]), (0, 70000, [15, 12, 28, 19])]
    return ids, segs, sem, things


def _image_b() -> tuple[np.ndarray, list[dict]]:
    ids = np.full((16, 12), 2, np.int64)
    ids[3:9, 2:6] = 1
    return ids, [{"id": 1, "category_id": 3}, {"id": 2, "category_id": 10}]


def _write_dataset(
    root: Path,
    entries: list[tuple[int, np.ndarray, list[dict] | None]],
    categories: list[dict] = CATEGORIES,
) -> tuple[Path, Path, Path]:
    """entries: (image id, ids map, segments_info or None for no panoptic annotation)."""
    img_dir, pan_dir = root / "images", root / "panoptic"
    img_dir.mkdir(exist_ok=True)
    pan_dir.mkdir(exist_ok=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for image_id, ids, segs in entries:
        h, w = ids.shape
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            img_dir / f"{image_id}.png"
        )
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        if segs is not None:
            Image.fromarray(id_to_rgb(ids)).save(pan_dir / f"{image_id}.png")
            anns.append(
                {"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": segs}
            )
    path = root / "panoptic.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path, img_dir, pan_dir


@pytest.fixture
def handmade(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Images 1 (20x30, crowd/void/stuff/things), 2 (16x12), 3 (10x14, no panoptic annotation)."""
    ids_a, segs_a, _, _ = _image_a()
    ids_b, segs_b = _image_b()
    return _write_dataset(
        tmp_path, [(1, ids_a, segs_a), (2, ids_b, segs_b), (3, np.zeros((10, 14), np.int64), None)]
    )


def _png_ids(path: str | Path) -> np.ndarray:
    return rgb_to_id(np.asarray(Image.open(path).convert("RGB")))


def _tight_box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _nearest_exact(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reference nearest-neighbour resize sampling pixel centres: src = floor((dst + 0.5) * in / out)."""
    (h, w), (oh, ow) = a.shape, size
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return a[rows][:, cols]


# ----------------------------------------------------------------------------- loading


def test_load_synthetic_categories_and_records(synth):
    pan = _load_synth(synth)
    assert pan.class_names == list(THING_CLASSES) and pan.category_ids == list(range(1, 8))
    assert pan.stuff_names == list(STUFF_CLASSES) == [
        "sky",
        "ground",
    ] and pan.stuff_category_ids == [8, 9]
    assert pan.num_classes == 7 and pan.num_stuff_classes == 2
    raw = json.loads(Path(synth["panoptic_train_json"]).read_text())
    assert [r.image_id for r in pan.records] == [im["id"] for im in raw["images"]]
    for rec, ann in zip(pan.records, raw["annotations"]):
        assert rec.file_name == str((synth["train_images"] / ann["file_name"]).resolve())
        assert rec.panoptic_file == str((synth["panoptic_train_dir"] / ann["file_name"]).resolve())
        assert [s.id for s in rec.segments] == [s["id"] for s in ann["segments_info"]]
        for seg, info in zip(rec.segments, ann["segments_info"]):
            assert seg.isthing == (info["category_id"] <= 7)
            assert seg.category == (
                info["category_id"] - 1 if seg.isthing else info["category_id"] - 8
            )
    n_things = sum(s["category_id"] <= 7 for a in raw["annotations"] for s in a["segments_info"])
    assert pan.stats["thing_segments"] == n_things > 0 and pan.stats["stuff_segments"] > 0
    assert pan.stats["images"] == 6 and pan.stats["images_without_annotations"] == 0


def test_load_handmade_records_and_stats(handmade):
    pan = load_coco_panoptic(*handmade)
    assert pan.class_names == ["dog", "cat"] and pan.category_ids == [1, 3]
    assert pan.stuff_names == ["sky", "grass"] and pan.stuff_category_ids == [10, 20]
    a, _, c = pan.records
    assert [(s.id, s.category, s.isthing, s.iscrowd) for s in a.segments] == [
        (5, 0, False, False),
        (6, 1, False, False),
        (300, 1, True, False),
        (70000, 0, True, False),
        (8, 0, True, True),
        (9, 1, False, True),
    ]
    assert a.segments[2].bbox_xyxy == (3.0, 2.0, 11.0, 7.0) and a.segments[3].bbox_xyxy is None
    assert c.panoptic_file is None and c.segments == () and (c.height, c.width) == (10, 14)
    assert pan.stats == {
        "images": 3,
        "images_without_annotations": 1,
        "segments": 8,
        "thing_segments": 4,
        "stuff_segments": 4,
        "crowd_segments": 2,
    }


# ----------------------------------------------------------------------------- dataset targets


def test_synthetic_instances_and_sem_seg_match_png(synth):
    ds = PanopticDataset(_load_synth(synth), None, train=True)
    raw = json.loads(Path(synth["panoptic_train_json"]).read_text())
    seen_stuff = set()
    for i, ann in enumerate(raw["annotations"]):
        s = ds[i]
        ids = _png_ids(synth["panoptic_train_dir"] / ann["file_name"])
        things = [x for x in ann["segments_info"] if x["category_id"] <= 7 and not x["iscrowd"]]
        t = s.target
        assert len(t) == len(things) and t.masks.shape == (len(things), 64, 96)
        assert t.labels.tolist() == [x["category_id"] - 1 for x in things]
        for mask, box, x in zip(t.masks, t.boxes, things):
            assert np.array_equal(mask.numpy(), ids == x["id"])
            assert box.tolist() == _tight_box(ids == x["id"])
        expected = np.full(ids.shape, IGNORE_LABEL)
        for x in ann["segments_info"]:
            if x["category_id"] > 7:
                expected[ids == x["id"]] = x["category_id"] - 8
                seen_stuff.add(x["category_id"] - 8)
        assert s.sem_seg.dtype == torch.int64 and s.sem_seg.shape == (64, 96)
        assert np.array_equal(s.sem_seg.numpy(), expected)
        assert (s.sem_seg[t.masks.any(0)] == IGNORE_LABEL).all()
    assert seen_stuff == {0, 1}


def test_handmade_targets_crowd_void_and_no_annotation(handmade):
    ds = PanopticDataset(load_coco_panoptic(*handmade), None, train=True)
    ids, _, sem, things = _image_a()
    s = ds[0]
    assert s.image.shape == (3, 20, 30) and s.image_id == 1
    assert np.array_equal(s.sem_seg.numpy(), sem)
    assert (
        s.sem_seg[0:4, 20:30].eq(IGNORE_LABEL).all()
        and s.sem_seg[5:9, 24:30].eq(IGNORE_LABEL).all()
    )
    assert s.sem_seg[15:20, 0:5].eq(IGNORE_LABEL).all()  # void
    assert s.target.labels.tolist() == [label for label, _, _ in things]  # crowd dog excluded
    assert s.target.boxes.tolist() == [box for _, _, box in things]
    for mask, (_, sid, _) in zip(s.target.masks, things):
        assert np.array_equal(mask.numpy(), ids == sid)
    empty = ds[2]  # no panoptic annotation: all void, no instances
    assert len(empty.target) == 0 and empty.target.masks.shape == (0, 10, 14)
    assert empty.sem_seg.shape == (10, 14) and empty.sem_seg.eq(IGNORE_LABEL).all()


def test_max_instances_keeps_largest_mask_in_training(handmade):
    pan = load_coco_panoptic(*handmade)
    kept = PanopticDataset(pan, None, train=True, max_instances=1)[0]
    assert (
        kept.target.labels.tolist() == [0] and kept.target.masks[0].sum() == 91
    )  # dog beats cat (40)
    assert (
        kept.sem_seg[2:7, 3:11].eq(IGNORE_LABEL).all()
    )  # the dropped thing is not relabelled stuff
    assert len(PanopticDataset(pan, None, train=False, max_instances=1)[0].target) == 2


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("short", [13, 24, 40])
def test_transforms_keep_sem_seg_aligned(handmade, short):
    pan = load_coco_panoptic(*handmade)
    ids, _, _, things = _image_a()
    lut = {5: 0, 6: 1}  # non-crowd stuff id -> label
    oh, ow = resized_shape(20, 30, short, 1000)
    ref_ids = _nearest_exact(ids, (oh, ow))
    ref_sem = np.vectorize(lambda v: lut.get(int(v), IGNORE_LABEL))(ref_ids)
    for flip in (0.0, 1.0):
        s = PanopticDataset(pan, build_train_transforms((short,), 1000, flip), train=True)[0]
        want_ids = ref_ids[:, ::-1] if flip else ref_ids
        want_sem = ref_sem[:, ::-1] if flip else ref_sem
        assert s.image.shape[-2:] == (oh, ow) and s.sem_seg.shape == (oh, ow)
        assert s.sem_seg.dtype == torch.int64 and np.array_equal(s.sem_seg.numpy(), want_sem)
        visible = [(label, sid) for label, sid, _ in things if (want_ids == sid).any()]
        assert s.target.labels.tolist() == [label for label, _ in visible]
        for mask, (_, sid) in zip(s.target.masks, visible):
            assert np.array_equal(mask.numpy(), want_ids == sid)


def test_sanitize_filters_instances_but_not_sem_seg():
    h, w = 3, 5  # as many rows as boxes: a per-instance filter would silently drop a row
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, :, :2] = masks[2, :, 3:] = True
    sem = torch.arange(h * w, dtype=torch.uint8).reshape(h, w)
    sample = {
        "image": tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)),
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[0, 0, 2, 3], [2, 1, 2.5, 2], [3, 0, 5, 3.0]]),
            format="XYXY",
            canvas_size=(h, w),
        ),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([4, 5, 6]),
        "sem_seg": tv_tensors.Mask(sem),
    }
    out = SanitizeInstances(min_size=1, labels_getter=lambda s: (s["labels"],))(sample)
    assert (
        out["labels"].tolist() == [4, 6]
        and out["masks"].shape == (2, h, w)
        and out["boxes"].shape == (2, 4)
    )
    assert isinstance(out["sem_seg"], tv_tensors.Mask) and torch.equal(out["sem_seg"], sem)
    assert list(out) == list(sample)


def test_augmentation_reproducible_with_sem_seg(synth):
    tf = build_train_transforms((32, 48, 64), 200, 0.5)
    a = PanopticDataset(_load_synth(synth), tf, train=True, seed=7)
    b = PanopticDataset(_load_synth(synth), tf, train=True, seed=7)
    b.set_epoch(1)
    for i in range(3):
        x, y = a[len(a) + i], b[i]
        assert torch.equal(x.image, y.image) and torch.equal(x.sem_seg, y.sem_seg)
        assert torch.equal(x.target.masks, y.target.masks)


# ----------------------------------------------------------------------------- collate


def test_collate_pads_sem_seg_with_ignore(handmade):
    ds = PanopticDataset(load_coco_panoptic(*handmade), None, train=False)
    samples = [ds[0], ds[1], ds[2]]
    batch = BatchCollator(size_divisibility=16)(samples)
    assert batch.images.shape == (3, 3, 32, 32)
    assert batch.sem_seg.shape == (3, 32, 32) and batch.sem_seg.dtype == torch.int64
    for k, s in enumerate(samples):
        h, w = s.sem_seg.shape
        assert torch.equal(batch.sem_seg[k, :h, :w], s.sem_seg)
        pad = torch.ones(32, 32, dtype=torch.bool)
        pad[:h, :w] = False
        assert batch.sem_seg[k][pad].eq(IGNORE_LABEL).all()
    assert batch.sem_seg[1].ne(IGNORE_LABEL).sum() == 16 * 12 - 6 * 4  # image 2: stuff around a cat
    assert torch.equal(batch.to("cpu").sem_seg, batch.sem_seg)
    # instance-only samples -> no semantic map; mixing them with panoptic samples is refused
    plain = Sample(
        image=samples[0].image,
        target=samples[0].target,
        image_id=1,
        original_size=(20, 30),
        file_name="x.png",
    )
    assert BatchCollator(16)([plain]).sem_seg is None
    with pytest.raises(ValueError, match="1 of 2 samples carry a sem_seg"):
        BatchCollator(16)([plain, samples[1]])


# ----------------------------------------------------------------------------- errors


def test_missing_png(handmade):
    json_path, img_dir, pan_dir = handmade
    (pan_dir / "2.png").unlink()
    with pytest.raises(
        DatasetError, match=r"panoptic\.json: 1 of 2 panoptic PNGs are missing.*2\.png"
    ) as err:
        load_coco_panoptic(json_path, img_dir, pan_dir)
    assert str(err.value).startswith(str(json_path))
    ds = PanopticDataset(
        load_coco_panoptic(json_path, img_dir, pan_dir, check_files=False), None, train=True
    )
    with pytest.raises(
        ImageReadError, match=r"panoptic/2\.png: cannot read image \(file not found\)"
    ):
        ds[1]


def test_png_size_mismatch(handmade):
    json_path, img_dir, pan_dir = handmade
    Image.fromarray(id_to_rgb(np.full((12, 16), 2))).save(pan_dir / "2.png")  # transposed size
    ds = PanopticDataset(load_coco_panoptic(*handmade), None, train=True)
    with pytest.raises(
        DatasetError,
        match=r"panoptic/2\.png: panoptic PNG is 12x16 \(HxW\) but its "
        r"image .*images/2\.png is 16x12",
    ):
        ds[1]


def test_png_and_json_segment_ids_disagree(tmp_path: Path):
    ids, segs = _image_b()
    ds = PanopticDataset(
        load_coco_panoptic(
            *_write_dataset(tmp_path, [(1, ids, segs + [{"id": 77, "category_id": 3}])])
        ),
        None,
        train=True,
    )
    with pytest.raises(
        DatasetError,
        match=r"panoptic/1\.png: segment id\(s\) \[77\] of image id=1 in the "
        r"JSON have no pixels",
    ):
        ds[0]
    ids[0, 0] = 99
    ds = PanopticDataset(
        load_coco_panoptic(*_write_dataset(tmp_path, [(1, ids, segs)])), None, train=True
    )
    with pytest.raises(
        DatasetError, match=r"panoptic/1\.png: the PNG has segment id\(s\) \[99\] that"
    ):
        ds[0]


_SEG_OK = [{"id": 1, "category_id": 3}, {"id": 2, "category_id": 10}]


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["annotations"][0]["segments_info"].append({"id": 3, "category_id": 42}),
            r"annotation of image id=1 \(1\.png\) segments_info\[2\]: unknown category_id 42",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"].append({"id": 2, "category_id": 3}),
            r"annotation of image id=1 \(1\.png\): duplicated segment id 2",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"].append({"id": 0, "category_id": 3}),
            r"segments_info\[2\]: segment id 0 outside",
        ),
        (
            lambda d: d["annotations"][0].pop("segments_info"),
            r"annotations\[0\]: missing field\(s\) \['segments_info'\]",
        ),
        (
            lambda d: d["annotations"][0].update(image_id=9),
            r"annotations\[0\]: image_id 9 is not in 'images'",
        ),
        (
            lambda d: d["annotations"].append(dict(d["annotations"][0])),
            r"image id=1: image has more than one",
        ),
        (
            lambda d: d["categories"][0].pop("isthing"),
            r"categories\[0\]: missing field\(s\) \['isthing'\]",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"][0].update(bbox=[1, 2, 3]),
            r"'bbox' must be 4 finite",
        ),
        (lambda d: d.pop("annotations"), r"missing top-level key\(s\) \['annotations'\]"),
    ],
)
def test_inconsistent_json(tmp_path: Path, edit, message):
    json_path, img_dir, pan_dir = _write_dataset(tmp_path, [(1, _image_b()[0], _SEG_OK)])
    data = json.loads(json_path.read_text())
    edit(data)
    json_path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message) as err:
        load_coco_panoptic(json_path, img_dir, pan_dir)
    assert str(err.value).startswith(str(json_path))


def test_malformed_json(tmp_path: Path):
    path = tmp_path / "panoptic.json"
    path.write_text('{"images": [], "annotations": [')
    with pytest.raises(DatasetError, match=r"panoptic\.json: not valid JSON"):
        load_coco_panoptic(path, tmp_path, tmp_path)
    with pytest.raises(DatasetError, match=r"nope\.json: annotation file not found"):
        load_coco_panoptic(tmp_path / "nope.json", tmp_path, tmp_path)
