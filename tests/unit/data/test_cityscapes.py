"""Cityscapes gtFine → COCO conversion, checked against cityscapesscripts' own instance reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from dynaseg.cli import main
from dynaseg.data.cityscapes import VOID_KEY, convert_cityscapes
from dynaseg.data.coco import DatasetError, load_coco_instances

H, W = 64, 128
# split -> city -> number of images
LAYOUT = {"train": {"aachen": 2, "bochum": 3}, "val": {"frankfurt": 2, "lindau": 2}}


def oracle():
    """cityscapesscripts (test-only, installed by the Makefile): its per-image instance reader and
    label table."""
    try:
        from cityscapesscripts.evaluation.instances2dict import instances2dict
        from cityscapesscripts.helpers.labels import labels
    except ImportError as e:  # fail, never skip: CI installs the oracle through the Makefile
        pytest.fail(
            f"oracle not installed ({e}); `make install` runs: "
            "pip install --no-deps cityscapesscripts==2.3.0 pyquaternion==0.9.9"
        )
    return instances2dict, labels


def draw_instance_ids(seed: int) -> np.ndarray:
    """(H, W) uint16 instanceIds: stuff, void, overlapping instances of several classes (later ones
    occlude earlier ones), a car group, a person group, a tiny instance and caravan pixels."""
    rng = np.random.default_rng(seed)
    ids = np.full((H, W), 7, np.uint16)  # road
    ids[:6] = 23  # sky
    ids[6:10] = 0  # unlabeled (void)
    ids[10:16, 96:] = 4  # static (void)
    for index, label in enumerate([26, 26, 24, 25, 33, 27, 28, 32, 31, 26, 29]):
        y, x = int(rng.integers(10, 50)), int(rng.integers(0, 110))
        ids[y : y + int(rng.integers(8, 25)), x : x + int(rng.integers(8, 40))] = (
            label * 1000 + index
        )
    ids[52:60, 0:30] = 26  # car group
    ids[56:64, 40:60] = 24  # person group
    ids[30:36, 120:127] = 24_099  # tiny person (42 px)
    ids[0:3, 0:5] = 29  # caravan group (void)
    return ids


def write_cityscapes(root: Path, layout: dict = LAYOUT) -> dict[Path, np.ndarray]:
    """Write the official file layout (16-bit instanceIds, 8-bit labelIds, RGB images) and return
    each instanceIds file's array."""
    arrays = {}
    seed = 0
    for split, cities in layout.items():
        for city, count in cities.items():
            for frame in range(count):
                seed += 1
                stem = f"{city}_{seed:06d}_{frame:06d}"
                ids = draw_instance_ids(seed)
                gt_dir, img_dir = (
                    root / "gtFine" / split / city,
                    root / "leftImg8bit" / split / city,
                )
                gt_dir.mkdir(parents=True, exist_ok=True)
                img_dir.mkdir(parents=True, exist_ok=True)
                gt_path = gt_dir / f"{stem}_gtFine_instanceIds.png"
                Image.fromarray(ids).save(gt_path)  # mode I;16, as the official files
                labels = np.where(ids >= 1000, ids // 1000, ids).astype(np.uint8)
                Image.fromarray(labels).save(gt_dir / f"{stem}_gtFine_labelIds.png")
                Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(
                    img_dir / f"{stem}_leftImg8bit.png"
                )
                arrays[gt_path] = ids
    return arrays


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    arrays = write_cityscapes(root)
    paths = convert_cityscapes(root, root / "coco")
    return root, arrays, paths


def test_matches_cityscapesscripts_instances(converted):
    instances2dict, labels = oracle()
    root, arrays, paths = converted
    scored = {lb.name: lb.id for lb in labels if lb.hasInstances and not lb.ignoreInEval}
    void_ids = [lb.id for lb in labels if lb.ignoreInEval]
    theirs = instances2dict([str(p) for p in arrays])
    num_images = 0
    for split in ("train", "val"):
        data = json.loads(paths[f"{split}_json"].read_text())
        assert {(c["id"], c["name"]) for c in data["categories"]} == {
            (i, n) for n, i in scored.items()
        }
        anns_of: dict[int, list] = {}
        for a in data["annotations"]:
            anns_of.setdefault(a["image_id"], []).append(a)
        for image in data["images"]:
            num_images += 1
            assert (paths[f"{split}_images"] / image["file_name"]).is_file()
            stem = image["file_name"].split("/")[1][: -len("_leftImg8bit.png")]
            gt_path = root / "gtFine" / split / image["file_name"].split("/")[0]
            gt_path = gt_path / f"{stem}_gtFine_instanceIds.png"
            ids = arrays[gt_path]
            assert (image["height"], image["width"]) == ids.shape
            # the same instances (and group regions), classes and pixel counts as the oracle
            expected = sorted(
                (inst["instID"], inst["labelID"], inst["pixelCount"])
                for name in scored
                for inst in theirs[str(gt_path.resolve())][name]
            )
            ours = anns_of.get(image["id"], [])
            assert (
                sorted((a["cityscapes_id"], a["category_id"], a["area"]) for a in ours) == expected
            )
            assert any(a["iscrowd"] for a in ours)
            for a in ours:
                mask = ids == a["cityscapes_id"]
                assert a["iscrowd"] == (a["cityscapes_id"] < 1000)
                assert np.array_equal(mask_utils.decode(a["segmentation"]).astype(bool), mask)
                rows, cols = np.nonzero(mask)
                x0, y0 = cols.min(), rows.min()
                assert a["bbox"] == [x0, y0, cols.max() + 1 - x0, rows.max() + 1 - y0]
            void = mask_utils.decode(image[VOID_KEY]).astype(bool)
            assert np.array_equal(void, np.isin(ids, void_ids))
    assert num_images == len(arrays)


def test_loads_as_a_dynaseg_dataset(converted):
    _, _, paths = converted
    data = load_coco_instances(paths["val_json"], paths["val_images"])
    assert data.class_names == [
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ]
    assert len(data.records) == 4 and all(r.annotations for r in data.records)


def test_cli_converts_with_worker_processes(tmp_path, capsys):
    write_cityscapes(tmp_path / "cs", {"val": {"lindau": 3}})
    root, out = str(tmp_path / "cs"), str(tmp_path / "o")
    rc = main(["data", "cityscapes", "--root", root, "--out", out, "--workers", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    json_path = tmp_path / "o" / "annotations" / "instances_val.json"
    assert f"val_json: {json_path}" in out
    assert f"val_images: {tmp_path / 'cs' / 'leftImg8bit' / 'val'}" in out
    assert "train_json" not in out
    serial = convert_cityscapes(tmp_path / "cs", tmp_path / "serial", num_workers=0)
    assert json.loads(json_path.read_text()) == json.loads(serial["val_json"].read_text())


def test_cli_bad_root_is_one_line(tmp_path, capsys):
    rc = main(["data", "cityscapes", "--root", str(tmp_path / "nope"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("dynaseg: error: Cityscapes root ")


GT = "gtFine/val/lindau/lindau_000001_000000_gtFine_instanceIds.png"
IMAGE = "leftImg8bit/val/lindau/lindau_000001_000000_leftImg8bit.png"


def _set_pixel(value: int):
    def corrupt(root: Path) -> None:
        ids = np.asarray(Image.open(root / GT)).copy()
        ids[5, 5] = value
        Image.fromarray(ids).save(root / GT)

    return corrupt


BAD_INPUTS = {
    "no gtFine": (lambda root: (root / "gtFine").rename(root / "x"), "has no gtFine folder"),
    "no split": (lambda root: (root / "gtFine/val").rename(root / "x"), "none of the split"),
    "empty split": (
        lambda root: (root / GT).unlink(),
        r"holds no <city>/\*_gtFine_instanceIds.png files",
    ),
    "not an image": (lambda root: (root / GT).write_text("hello"), "cannot read it as a PNG"),
    "truncated": (
        lambda root: (root / GT).write_bytes((root / GT).read_bytes()[:80]),
        "cannot read it as a PNG",
    ),
    "jpeg": (
        lambda root: Image.new("L", (W, H)).save(root / GT, format="JPEG"),
        r"not a PNG file \(format JPEG\)",
    ),
    "rgb png": (
        lambda root: Image.new("RGB", (W, H)).save(root / GT),
        "mode 'RGB', expected a 16-bit",
    ),
    "size": (
        lambda root: Image.fromarray(np.full((H, W + 1), 7, np.uint16)).save(root / GT),
        r"size 129x64 differs from its image .*\(128x64\)",
    ),
    "unknown instance label": (_set_pixel(45_001), "pixel value 45001 has unknown .* label id 45"),
    "unknown plain label": (_set_pixel(200), "pixel value 200 has unknown .* label id 200"),
    "missing image": (lambda root: (root / IMAGE).unlink(), "is missing"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_one_line_dataset_error(tmp_path, case):
    write_cityscapes(tmp_path, {"val": {"lindau": 1}})
    corrupt, message = BAD_INPUTS[case]
    corrupt(tmp_path)
    with pytest.raises(DatasetError, match=message) as info:
        convert_cityscapes(tmp_path, tmp_path / "out")
    assert "\n" not in str(info.value)
    if case not in ("no gtFine", "no split", "empty split"):
        assert "lindau_000001_000000" in str(info.value)  # names the file


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        convert_cityscapes(tmp_path / "nope", tmp_path / "out")
