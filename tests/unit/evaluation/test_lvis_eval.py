"""LVIS federated evaluation against the ``lvis`` package (LVIS v1's official API) as oracle.

The fixture exercises every federated rule: per-image negative and not-exhaustive lists,
detections of categories nobody checked in an image (dropped), unmatched detections of a
not-exhaustive category (ignored), an image with more than 300 detections (the cap is per image,
over all categories), all three frequency groups, and objects of all three sizes.
"""

import copy
import json
import math
import sys
import types

import numpy as np
import pycocotools.mask as mask_util
import pytest

from dynaseg.evaluation.coco import EvaluationError, evaluate_coco
from dynaseg.evaluation.lvis import top_detections_per_image

H, W = 160, 200
FREQUENCIES = ["r", "r", "c", "c", "f", "f"]
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _ellipse(rng, box) -> np.ndarray:
    x0, y0, w, h = box
    yy, xx = np.mgrid[:H, :W]
    cx, cy = x0 + w / 2 + rng.uniform(-1, 1), y0 + h / 2 + rng.uniform(-1, 1)
    return ((xx + 0.5 - cx) / (w / 2)) ** 2 + ((yy + 0.5 - cy) / (h / 2)) ** 2 <= 1


def _random_box(rng) -> list[float]:
    side = rng.choice([12, 40, 150])  # small, medium and large objects
    w, h = min(side * rng.uniform(0.8, 1.3), W - 1), side * rng.uniform(0.8, 1.0)
    return [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), float(w), float(h)]


def _fixture(seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    cats = [
        {"id": 10 + k, "name": f"c{k}", "frequency": f, "synset": f"c{k}.n.01"}
        for k, f in enumerate(FREQUENCIES)
    ]
    cat_ids = [c["id"] for c in cats]
    images, anns, results = [], [], []
    for i in range(1, 9):
        present = [int(c) for c in rng.choice(cat_ids, size=3, replace=False)]
        absent = [c for c in cat_ids if c not in present]
        images.append(
            {
                "id": i,
                "height": H,
                "width": W,
                "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg",
                "neg_category_ids": absent[:2],  # absent[2] is unchecked in this image
                "not_exhaustive_category_ids": present[:1],
            }
        )
        for cid in present:
            for _ in range(int(rng.integers(1, 4))):
                box = _random_box(rng)
                mask = _ellipse(rng, box)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": i,
                        "category_id": cid,
                        "bbox": box,
                        "area": float(mask.sum()),
                        "segmentation": _rle(mask),
                    }
                )
                if rng.random() < 0.8:  # a detection of it, jittered
                    jit = [v + rng.normal(0, 0.08 * box[2 + k % 2]) for k, v in enumerate(box)]
                    jit[2], jit[3] = max(jit[2], 2.0), max(jit[3], 2.0)
                    results.append(_det(rng, i, cid, jit))
        # false positives: of absent (negative), unchecked and not-exhaustive categories
        for cid in [absent[0], absent[2], present[0], present[1]]:
            results.append(_det(rng, i, cid, _random_box(rng)))
    # one image with far more than 300 detections: only its 300 best count
    for _ in range(340):
        box = [float(v) for v in rng.uniform(0, 60, 2)] + [12.0, 12.0]
        results.append(_det(rng, 1, int(rng.choice(cat_ids)), box))
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, results


def _det(rng, image_id: int, cid: int, box: list[float]) -> dict:
    return {
        "image_id": image_id,
        "category_id": cid,
        "bbox": [round(v, 2) for v in box],
        "score": float(rng.uniform(0.01, 1.0)),
        "segmentation": _rle(_ellipse(rng, box)),
    }


def _oracle(tmp_path, monkeypatch, gt: dict, results: list[dict], iou_type: str) -> dict:
    # The package imports cv2 for its visualiser only, and uses np.float (gone in numpy >= 1.24).
    monkeypatch.setitem(sys.modules, "cv2", sys.modules.get("cv2", types.ModuleType("cv2")))
    monkeypatch.setattr(np, "float", float, raising=False)
    from lvis import LVIS, LVISEval, LVISResults

    path = tmp_path / "lvis_gt.json"
    path.write_text(json.dumps(gt))
    lvis_gt = LVIS(str(path))
    dets = copy.deepcopy(results)
    if iou_type == "segm":  # as detectron2 does: area ranges then use the mask area
        for d in dets:
            d.pop("bbox")
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, dets, max_dets=300), iou_type)
    ev.run()
    return {k: ev.results[k] * 100 for k in KEYS}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_metrics_equal_the_lvis_package(tmp_path, monkeypatch, iou_type):
    gt, results = _fixture()
    ours = evaluate_coco(gt, results, (iou_type,))[iou_type]
    expected = _oracle(tmp_path, monkeypatch, gt, results, iou_type)
    assert min(expected.values()) >= 0  # every number is defined on the fixture
    for key in KEYS:
        assert ours[key] == pytest.approx(expected[key], abs=1e-6), key
    assert 5 < ours["AP"] < 95  # the fixture is neither trivial nor hopeless


def test_federated_rules_change_the_numbers():
    """Each rule matters on the fixture: dropping the LVIS fields (plain COCO evaluation at 100
    detections) gives different numbers."""
    gt, results = _fixture()
    lvis_ap = evaluate_coco(gt, results, ("bbox",))["bbox"]
    plain = copy.deepcopy(gt)
    for c in plain["categories"]:
        del c["frequency"]
    for im in plain["images"]:
        del im["neg_category_ids"], im["not_exhaustive_category_ids"]
    coco_ap = evaluate_coco(plain, results, ("bbox",))["bbox"]
    assert "APr" not in coco_ap
    assert abs(lvis_ap["AP"] - coco_ap["AP"]) > 0.5


def test_top_detections_per_image_keeps_the_best_over_all_categories():
    results = [
        {"image_id": 1, "category_id": k % 3, "score": s}
        for k, s in enumerate([0.2, 0.9, 0.5, 0.7])
    ]
    results.append({"image_id": 2, "category_id": 0, "score": 0.1})
    kept = top_detections_per_image(results, limit=2)
    assert [r["score"] for r in kept] == [0.9, 0.7, 0.1]


def test_frequency_group_without_categories_is_nan():
    gt, results = _fixture()
    for c in gt["categories"]:
        c["frequency"] = "f" if c["frequency"] == "r" else c["frequency"]
    m = evaluate_coco(gt, results, ("bbox",))["bbox"]
    assert math.isnan(m["APr"]) and not math.isnan(m["APf"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda gt: gt["categories"][0].update(frequency="x"), "needs 'frequency'"),
        (lambda gt: gt["images"][3].pop("neg_category_ids"), "images\\[3\\].*neg_category_ids"),
        (
            lambda gt: gt["images"][0].update(not_exhaustive_category_ids=[999]),
            "unknown category id 999",
        ),
    ],
)
def test_malformed_lvis_fields_are_one_line_errors(edit, message):
    gt, results = _fixture()
    edit(gt)
    with pytest.raises(EvaluationError, match=message):
        evaluate_coco(gt, results, ("bbox",))


def test_lvis_needs_the_faster_backend_and_its_categories():
    gt, results = _fixture()
    with pytest.raises(EvaluationError, match="LVIS"):
        evaluate_coco(gt, results, ("bbox",), backend="pycocotools")
    with pytest.raises(EvaluationError, match="no class-agnostic form"):
        evaluate_coco(gt, results, ("bbox",), class_agnostic=True)


def test_eval_cli_recognises_lvis_by_content(tmp_path, capsys):
    from dynaseg.cli import main

    gt, results = _fixture()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "r.json").write_text(json.dumps(results))
    args = ["eval", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "r.json")]
    assert main([*args, "--iou-types", "bbox", "segm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["bbox", "segm"]
    for metrics in out.values():
        assert list(metrics) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "APr" in text and "[rare: 2 classes]" in text and "[frequent: 2 classes]" in text
