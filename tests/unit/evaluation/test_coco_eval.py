"""Tests for dynaseg.evaluation.coco (COCO bbox/segm evaluation)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from dynaseg.evaluation.coco import (
    STAT_NAMES,
    CategoryMap,
    EvaluationError,
    encode_masks,
    evaluate_coco,
    format_metrics_table,
    format_per_class_table,
    instances_to_coco_results,
)
from dynaseg.structures.instances import Instances

# pycocotools.mask.decode (used by these tests only) trips a NumPy 2 copy-keyword warning.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BACKENDS = ("faster", "pycocotools")
SIZES = {1: (40, 50), 2: (60, 40), 3: (120, 100)}  # image_id -> (h, w)


def _rect_poly(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann_rle(ann: dict, hw: tuple[int, int]) -> dict:
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, *hw))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, *hw)
    return seg


def _make_gt() -> dict:
    """3 images, polygon + compressed + uncompressed RLE GT; category ids 3, 7 and 9 (no GT)."""
    images = [
        {"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, (h, w) in SIZES.items()
    ]
    anns: list[dict] = []

    def add(image_id: int, cat: int, seg) -> None:
        hw = SIZES[image_id]
        ann = {
            "id": len(anns) + 1,
            "image_id": image_id,
            "category_id": cat,
            "segmentation": seg,
            "iscrowd": 0,
        }
        rle = _ann_rle(ann, hw)
        ann["area"] = float(mask_utils.area(rle))
        ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        anns.append(ann)

    add(1, 3, [_rect_poly(5, 5, 25, 20)])
    add(1, 7, [[30, 10, 45, 12, 40, 35, 28, 30]])
    m = np.zeros(SIZES[2], np.uint8, order="F")
    m[10:30, 8:30] = 1
    rle = mask_utils.encode(m)
    add(2, 3, {"size": rle["size"], "counts": rle["counts"].decode()})  # compressed RLE
    m2 = np.zeros(SIZES[2], np.uint8)
    m2[35:55, 5:35] = 1
    counts, flat, prev, run = [], m2.flatten(order="F"), 0, 0
    for v in flat:  # uncompressed RLE (column-major runs starting with zeros)
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    add(2, 7, {"size": list(SIZES[2]), "counts": counts})
    add(3, 7, [_rect_poly(10, 20, 80, 90)])  # medium object (area 4900)
    add(3, 3, [_rect_poly(85, 5, 95, 15)])
    cats = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 9, "name": "bird"}]
    return {"images": images, "annotations": anns, "categories": cats}


def _gt_as_results(gt: dict) -> list[dict]:
    out = []
    for a in gt["annotations"]:
        rle = dict(_ann_rle(a, SIZES[a["image_id"]]))
        if isinstance(rle["counts"], bytes):
            rle["counts"] = rle["counts"].decode()
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": list(a["bbox"]),
                "score": 1.0,
                "segmentation": rle,
            }
        )
    return out


def _perturb(results: list[dict]) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for k, r in enumerate(results[1:]):  # drop one detection -> a miss
        r = copy.deepcopy(r)
        r["bbox"] = [v + float(rng.uniform(-3, 3)) for v in r["bbox"]]
        r["bbox"][2:] = [max(v, 1.0) for v in r["bbox"][2:]]
        m = mask_utils.decode(r["segmentation"])
        m = np.asfortranarray(np.roll(m, int(rng.integers(1, 4)), axis=k % 2))
        enc = mask_utils.encode(m)
        r["segmentation"] = {"size": enc["size"], "counts": enc["counts"].decode()}
        r["score"] = float(rng.uniform(0.2, 1.0))
        out.append(r)
    fp = copy.deepcopy(results[0])  # a confident false positive of the wrong class
    fp["category_id"] = 7 if fp["category_id"] == 3 else 3
    fp["score"] = 0.95
    out.append(fp)
    return out


@pytest.fixture()
def gt_file(tmp_path: Path) -> Path:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_make_gt()))
    return path


def _write(tmp_path: Path, name: str, obj) -> Path:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _assert_same(a: float, b: float, tol: float = 1e-6) -> None:
    assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol, (a, b)


# --------------------------------------------------------------------------- CategoryMap
def test_category_map_sorted_by_id(gt_file: Path) -> None:
    cmap = CategoryMap.from_coco_json(gt_file)
    assert cmap.category_ids == [3, 7, 9]
    assert cmap.names == ["cat", "dog", "bird"]
    assert cmap.to_category_id(1) == 7 and cmap.to_contiguous(9) == 2
    assert CategoryMap.from_coco_json(_make_gt()).names == cmap.names
    with pytest.raises(KeyError):
        cmap.to_contiguous(4)
    with pytest.raises(KeyError):
        cmap.to_category_id(3)


# --------------------------------------------------------------------------- (a) perfect results
@pytest.mark.parametrize("backend", BACKENDS)
def test_gt_as_results_gives_100(gt_file: Path, tmp_path: Path, backend: str) -> None:
    res_file = _write(tmp_path, "res.json", _gt_as_results(_make_gt()))
    m = evaluate_coco(gt_file, res_file, backend=backend)
    for iou_type in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APm"):
            assert m[iou_type][k] == pytest.approx(100.0), (iou_type, k)
        assert math.isnan(m[iou_type]["APl"])  # no large objects in the GT


# --------------------------------------------------------------------------- (b) backends agree
def test_perturbed_results_backends_agree() -> None:
    gt = _make_gt()
    results = _perturb(_gt_as_results(gt))
    gt_before, res_before = copy.deepcopy(gt), copy.deepcopy(results)
    fast = evaluate_coco(gt, results, backend="faster")
    ref = evaluate_coco(gt, results, backend="pycocotools")
    assert gt == gt_before and results == res_before  # inputs are never modified
    for iou_type in ("bbox", "segm"):
        assert fast[iou_type]["AP"] < 100.0
        for k in STAT_NAMES:
            _assert_same(fast[iou_type][k], ref[iou_type][k])
        for name, ap in fast[iou_type]["per_class"].items():
            _assert_same(ap, ref[iou_type]["per_class"][name])


# --------------------------------------------------------------------------- (b2) classes ignored
def _swapped_classes(results: list[dict]) -> list[dict]:
    """Every detection in place, with the other of the two GT classes (cat 3 <-> dog 7)."""
    return [{**r, "category_id": 10 - r["category_id"]} for r in results]


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_agnostic_counts_a_wrong_class_in_place_as_found(backend: str) -> None:
    gt = _make_gt()
    swapped = _swapped_classes(_gt_as_results(gt))
    aware = evaluate_coco(gt, swapped, backend=backend)
    agnostic = evaluate_coco(gt, swapped, backend=backend, class_agnostic=True)
    for iou_type in ("bbox", "segm"):
        assert aware[iou_type]["AP"] == pytest.approx(0.0)  # every detection has the wrong class
        assert agnostic[iou_type]["AP"] == pytest.approx(100.0)
        assert agnostic[iou_type]["per_class"] == {}
    assert evaluate_coco(gt, [], ("bbox",), class_agnostic=True)["bbox"]["per_class"] == {}


def test_eval_cli_class_agnostic(gt_file: Path, tmp_path: Path, capsys) -> None:
    from dynaseg.cli import main

    res = _write(tmp_path, "res.json", _swapped_classes(_gt_as_results(_make_gt())))
    args = ["eval", "--gt", str(gt_file), "--results", str(res), "--iou-types", "bbox"]
    assert main([*args, "--class-agnostic", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bbox"]["AP"] == pytest.approx(100.0)
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bbox"]["AP"] == pytest.approx(0.0)
    assert main([*args, "--class-agnostic"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("classes ignored") and "per-class" not in text
    assert main([*args, "--class-agnostic", "--drawn-at", "0.3"]) == 2
    assert "--drawn-at and --class-agnostic are two runs" in capsys.readouterr().err
    assert main(["eval", "--panoptic", "--class-agnostic"]) == 2
    assert "--class-agnostic reports on instance detections" in capsys.readouterr().err


# --------------------------------------------------------------------------- (c) round trip
def _gt_as_instances(gt: dict, cmap: CategoryMap) -> dict[int, Instances]:
    out = {}
    for image_id, hw in SIZES.items():
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
        masks = np.stack([mask_utils.decode(_ann_rle(a, hw)) for a in anns]).astype(bool)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        out[image_id] = Instances(
            image_size=hw,
            boxes=torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            labels=torch.tensor([cmap.to_contiguous(a["category_id"]) for a in anns]),
            scores=torch.linspace(1.0, 0.5, len(anns)),
            masks=torch.from_numpy(masks),
        )
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_instances_round_trip(backend: str) -> None:
    gt = _make_gt()
    cmap = CategoryMap.from_coco_json(gt)
    results = []
    for image_id, inst in _gt_as_instances(gt, cmap).items():
        results += instances_to_coco_results(inst, image_id, cmap)
    assert len(results) == len(gt["annotations"])
    r = results[0]
    assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    assert isinstance(r["segmentation"]["counts"], str) and len(r["bbox"]) == 4
    json.dumps(results)  # serialisable as-is
    m = evaluate_coco(gt, results, backend=backend)
    assert m["bbox"]["AP"] == pytest.approx(100.0)
    assert m["segm"]["AP"] == pytest.approx(100.0)


def test_instances_without_masks_and_empty() -> None:
    inst = Instances(
        image_size=(10, 10), boxes=torch.tensor([[1.0, 2.0, 5.0, 9.0]]), labels=torch.tensor([1])
    )
    (r,) = instances_to_coco_results(inst, 4, CategoryMap([3, 7], ["a", "b"]))
    assert r == {"image_id": 4, "category_id": 7, "bbox": [1.0, 2.0, 4.0, 7.0], "score": 1.0}
    empty = Instances.empty((10, 10), with_scores=True, with_masks=True)
    assert instances_to_coco_results(empty, 1, None) == []


def test_encode_masks_matches_per_mask_encoding() -> None:
    masks = torch.rand(3, 17, 23) > 0.5
    for m, rle in zip(masks.numpy(), encode_masks(masks)):
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle["size"] == ref["size"] and rle["counts"] == ref["counts"].decode()


# --------------------------------------------------------------------------- (d) empty results
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results_give_zeros(gt_file: Path, tmp_path: Path, backend: str) -> None:
    for results in ([], _write(tmp_path, "empty.json", "[]")):
        m = evaluate_coco(gt_file, results, backend=backend)
        for iou_type in ("bbox", "segm"):
            assert all(m[iou_type][k] == 0.0 for k in STAT_NAMES)
            assert m[iou_type]["per_class"]["cat"] == 0.0
            assert math.isnan(m[iou_type]["per_class"]["bird"])


# --------------------------------------------------------------------------- (e) bad inputs
def _bad_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    good = _gt_as_results(_make_gt())
    no_score = copy.deepcopy(good)
    del no_score[2]["score"]
    bad_img = copy.deepcopy(good)
    bad_img[1]["image_id"] = 999
    bad_cat = copy.deepcopy(good)
    bad_cat[0]["category_id"] = 5
    return [
        (tmp_path / "missing.json", "does not exist"),
        (_write(tmp_path, "garbage.json", "{not json"), "not valid JSON"),
        (_write(tmp_path, "dict.json", {"annotations": good}), "list"),
        (_write(tmp_path, "no_score.json", no_score), "missing key"),
        (_write(tmp_path, "bad_img.json", bad_img), "image_id 999"),
        (_write(tmp_path, "bad_cat.json", bad_cat), "category_id 5"),
    ]


def test_bad_results_files_raise_clear_errors(gt_file: Path, tmp_path: Path) -> None:
    for path, problem in _bad_cases(tmp_path):
        with pytest.raises(EvaluationError) as info:
            evaluate_coco(gt_file, path)
        msg = str(info.value)
        assert str(path) in msg and problem in msg, msg
        assert "\n" not in msg and isinstance(info.value, ValueError)


def test_segm_without_masks_and_bad_gt(gt_file: Path, tmp_path: Path) -> None:
    boxes_only = [
        {k: v for k, v in r.items() if k != "segmentation"} for r in _gt_as_results(_make_gt())
    ]
    path = _write(tmp_path, "boxes.json", boxes_only)
    with pytest.raises(EvaluationError, match="segmentation") as info:
        evaluate_coco(gt_file, path)
    assert str(path) in str(info.value)
    assert evaluate_coco(gt_file, path, iou_types=("bbox",))["bbox"]["AP"] == pytest.approx(100)
    wrong_size = _gt_as_results(_make_gt())
    wrong_size[0]["segmentation"]["size"] = [10, 10]
    with pytest.raises(EvaluationError, match="image size"):
        evaluate_coco(gt_file, wrong_size)
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_coco(tmp_path / "nope.json", [])
    with pytest.raises(ValueError, match="backend"):
        evaluate_coco(gt_file, [], backend="detectron")


# --------------------------------------------------------------------------- (f) per-class + tables
def test_per_class_keys_are_names_and_tables(gt_file: Path) -> None:
    m = evaluate_coco(gt_file, _perturb(_gt_as_results(_make_gt())))
    for iou_type in ("bbox", "segm"):
        assert list(m[iou_type]["per_class"]) == ["cat", "dog", "bird"]
        assert math.isnan(m[iou_type]["per_class"]["bird"])
    table = format_metrics_table(m)
    lines = table.splitlines()
    assert lines[0].split() == list(STAT_NAMES)
    assert lines[2].startswith("bbox") and lines[3].startswith("segm")
    assert f"{m['segm']['AP']:.1f}" in lines[3]
    per_class = format_per_class_table(m, "segm")
    assert "cat" in per_class and "dog" in per_class
    assert f"{m['segm']['per_class']['dog']:.1f}" in per_class


def test_image_ids_subset_and_quiet(gt_file: Path, capsys: pytest.CaptureFixture) -> None:
    results = [r for r in _gt_as_results(_make_gt()) if r["image_id"] == 1]
    full = evaluate_coco(gt_file, results, iou_types=("bbox",), backend="pycocotools")
    sub = evaluate_coco(gt_file, results, iou_types=("bbox",), image_ids=[1])
    assert full["bbox"]["AP"] < 100.0 and sub["bbox"]["AP"] == pytest.approx(100.0)
    assert capsys.readouterr().out == ""
    with pytest.raises(EvaluationError, match="image_ids"):
        evaluate_coco(gt_file, results, image_ids=[1, 42])
