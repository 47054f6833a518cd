"""Tests for the deterministic synthetic COCO dataset generator."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from dynaseg.data.synthetic import (
    EASY_CLASSES,
    HARD_CLASSES,
    STUFF_CLASSES,
    THING_CLASSES,
    generate_synthetic,
    render_sample,
)

# pycocotools' decode triggers a numpy-2 DeprecationWarning inside annToMask; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

SIZE = 320
NUM_TRAIN, NUM_VAL = 50, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic(out, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def coco(dataset):
    return COCO(str(dataset["train_json"]))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _rgb2id(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def test_class_constants():
    assert THING_CLASSES == ("circle", "square", "triangle", "star", "gear", "blob", "ring")
    assert EASY_CLASSES + HARD_CLASSES == THING_CLASSES
    assert len(STUFF_CLASSES) >= 2 and STUFF_CLASSES[:2] == ("sky", "ground")


def test_layout_and_paths(dataset):
    assert set(dataset) == {
        "train_json",
        "val_json",
        "train_images",
        "val_images",
        "panoptic_train_json",
        "panoptic_train_dir",
        "panoptic_val_json",
        "panoptic_val_dir",
    }
    assert all(Path(p).exists() for p in dataset.values())
    assert sorted(p.name for p in dataset["train_images"].iterdir()) == [
        f"{i:06d}.png" for i in range(NUM_TRAIN)
    ]
    assert len(list(dataset["val_images"].iterdir())) == NUM_VAL
    assert len(list(dataset["panoptic_val_dir"].iterdir())) == NUM_VAL
    img = Image.open(dataset["val_images"] / "000000.png")
    assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert np.asarray(img).std() > 5  # textured, not flat


def test_determinism(tmp_path):
    kw = dict(num_train=3, num_val=2, image_size=(64, 96), max_objects=5)
    a = _files(Path(generate_synthetic(tmp_path / "a", seed=7, **kw)["train_json"]).parent.parent)
    b = _files(Path(generate_synthetic(tmp_path / "b", seed=7, **kw)["train_json"]).parent.parent)
    assert a == b and len(a) == 2 * 5 + 4
    c = _files(Path(generate_synthetic(tmp_path / "c", seed=8, **kw)["train_json"]).parent.parent)
    assert a["train/000000.png"] != c["train/000000.png"]
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]
    # An image does not depend on how many others are generated.
    d = _files(
        Path(
            generate_synthetic(tmp_path / "d", seed=7, **{**kw, "num_train": 1})["train_json"]
        ).parent.parent
    )
    assert (
        d["train/000000.png"] == a["train/000000.png"]
        and d["val/000001.png"] == a["val/000001.png"]
    )


def test_coco_instances(coco):
    cats = coco.loadCats(coco.getCatIds())
    assert [c["name"] for c in cats] == list(THING_CLASSES)
    assert [c["id"] for c in cats] == list(range(1, len(THING_CLASSES) + 1))
    assert {c["name"] for c in cats if c["supercategory"] == "easy"} == set(EASY_CLASSES)
    assert {c["name"] for c in cats if c["supercategory"] == "hard"} == set(HARD_CLASSES)
    assert sorted(coco.getImgIds()) == list(range(1, NUM_TRAIN + 1))
    anns = coco.loadAnns(coco.getAnnIds())
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    for img_id in coco.getImgIds():  # min_objects=1 -> every image is annotated
        assert coco.getAnnIds(imgIds=img_id)
    used = {coco.cats[a["category_id"]]["name"] for a in anns}
    assert used & set(EASY_CLASSES) and used & set(HARD_CLASSES)
    for a in anns:
        m = coco.annToMask(a)
        assert a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str)
        assert m.sum() == a["area"] >= 20
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and w > 0 and h > 0
        ys, xs = np.nonzero(m)
        assert [x, y, w, h] == [
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        ]


def test_size_independent_of_shape(coco):
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 150
    for group in (EASY_CLASSES, HARD_CLASSES):
        sizes = [max(a["bbox"][2:]) for a in anns if coco.cats[a["category_id"]]["name"] in group]
        assert min(sizes) < 32 and max(sizes) > 96, (group, sorted(sizes))


def test_border_and_occlusion(coco):
    anns = coco.loadAnns(coco.getAnnIds())
    touching = [
        a
        for a in anns
        if min(a["bbox"][:2]) == 0
        or max(a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) == SIZE
    ]
    assert len(touching) >= 5
    occluded = dropped = 0
    for index in range(20):
        for obj in render_sample(0, "train", index, SIZE).objects:
            vis, full = int(obj.visible.sum()), int(obj.mask.sum())
            assert not (obj.visible & ~obj.mask).any()
            occluded += obj.kept and vis < full
            dropped += not obj.kept
    assert occluded > 0 and dropped > 0


def test_render_sample_matches_files(dataset, coco):
    """Annotations are exactly the kept visible masks; dropped instances' visible pixels are VOID."""
    pan = json.loads(Path(dataset["panoptic_train_json"]).read_text())
    for index in range(10):
        sample = render_sample(0, "train", index, SIZE)
        assert np.array_equal(
            np.asarray(Image.open(dataset["train_images"] / f"{index:06d}.png")), sample.image
        )
        kept = [o for o in sample.objects if o.kept]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=index + 1))
        assert [o.category_id for o in kept] == [a["category_id"] for a in anns]
        for o, a in zip(kept, anns):
            assert np.array_equal(coco.annToMask(a).astype(bool), o.visible)
        ids = _rgb2id(dataset["panoptic_train_dir"] / pan["annotations"][index]["file_name"])
        dropped = sum(int(o.visible.sum()) for o in sample.objects if not o.kept)
        assert int((ids == 0).sum()) == dropped


def test_panoptic(dataset, coco):
    pan = json.loads(Path(dataset["panoptic_train_json"]).read_text())
    cats = {c["id"]: c for c in pan["categories"]}
    assert [cats[i]["name"] for i in range(1, 8)] == list(THING_CLASSES)
    assert all(cats[i]["isthing"] == 1 for i in range(1, 8))
    stuff = {c["name"]: c["id"] for c in cats.values() if c["isthing"] == 0}
    assert stuff == {"sky": 8, "ground": 9}
    assert [a["image_id"] for a in pan["annotations"]] == [im["id"] for im in pan["images"]]
    seen_stuff = set()
    for ann in pan["annotations"]:
        ids = _rgb2id(dataset["panoptic_train_dir"] / ann["file_name"])
        segs = ann["segments_info"]
        seg_ids = [s["id"] for s in segs]
        assert len(set(seg_ids)) == len(seg_ids) and 0 not in seg_ids
        assert set(np.unique(ids)) - {0} == set(seg_ids)  # every pixel is a segment or VOID
        for s in segs:
            m = ids == s["id"]
            ys, xs = np.nonzero(m)
            assert s["area"] == m.sum() and s["iscrowd"] == 0
            assert s["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
        things = [s for s in segs if cats[s["category_id"]]["isthing"]]
        inst = coco.loadAnns(coco.getAnnIds(imgIds=ann["image_id"]))
        assert [s["category_id"] for s in things] == [a["category_id"] for a in inst]
        for s, a in zip(things, inst):
            assert np.array_equal(ids == s["id"], coco.annToMask(a).astype(bool))
            assert s["area"] == a["area"]
        seen_stuff |= {s["category_id"] for s in segs if not cats[s["category_id"]]["isthing"]}
    assert seen_stuff == {8, 9}


def test_no_panoptic_and_empty_images(tmp_path):
    paths = generate_synthetic(
        tmp_path,
        num_train=2,
        num_val=0,
        image_size=48,
        min_objects=0,
        max_objects=0,
        panoptic=False,
        progress=True,
    )
    assert set(paths) == {"train_json", "val_json", "train_images", "val_images"}
    assert not list((tmp_path / "annotations").glob("panoptic*"))
    data = json.loads(paths["train_json"].read_text())
    assert len(data["images"]) == 2 and data["annotations"] == []
    assert json.loads(paths["val_json"].read_text())["images"] == []


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_train=-1),
        dict(num_val=-3),
        dict(image_size=31),
        dict(image_size=(64, 16)),
        dict(image_size=(64,)),
        dict(seed=-1),
        dict(min_objects=-1),
        dict(min_objects=5, max_objects=2),
        dict(num_train=1.5),
    ],
)
def test_bad_args(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path, **kwargs)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        render_sample(0, "test", 0)
