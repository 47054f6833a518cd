"""Cityscapes instance-level AP / AP50: hand-computed cases and the official cityscapesscripts
evaluation (evalInstanceLevelSemanticLabeling) as oracle on the same files."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from dynaseg.data.cityscapes import THING_CLASSES, convert_cityscapes
from dynaseg.evaluation.cityscapes import evaluate_cityscapes
from dynaseg.evaluation.coco import EvaluationError

H, W = 64, 128
CAR, PERSON, RIDER, TRUCK, BUS, MOTORCYCLE, BICYCLE = 26, 24, 25, 27, 28, 32, 33
NAMES = dict(THING_CLASSES)


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def official_evaluation():
    """cityscapesscripts' instance-level evaluation module (test-only, installed by the Makefile)."""
    try:
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cs_eval
    except ImportError as e:  # fail, never skip: CI installs the oracle through the Makefile
        pytest.fail(
            f"oracle not installed ({e}); `make install` runs: "
            "pip install --no-deps cityscapesscripts==2.3.0 pyquaternion==0.9.9"
        )
    return cs_eval


# --------------------------------------------------------------------------- scenes
def scene_with_every_case() -> tuple[np.ndarray, list[tuple[np.ndarray, int, float]]]:
    """instanceIds (H, W) and predictions (mask, label id, score); IoUs in the comments."""
    ids = np.full((H, W), 7, np.uint16)  # road
    ids[0:4] = 0  # unlabeled: void
    ids[4:10, 90:] = 4  # static: void
    ids[box(10, 30, 0, 20)] = 26_001  # 400 px
    ids[box(10, 30, 30, 50)] = 26_002  # 400 px
    ids[box(10, 30, 60, 80)] = 26_003  # 400 px, never predicted: a miss
    ids[box(40, 60, 0, 30)] = CAR  # car group, 600 px
    ids[box(40, 60, 40, 50)] = 24_001  # 200 px
    ids[box(40, 48, 60, 68)] = 26_004  # 64 px: below the 100 px minimum
    ids[box(40, 60, 100, 120)] = 29_001  # a caravan instance: neither scored nor void
    preds = [
        (box(10, 30, 0, 20), CAR, 0.9),  # perfect match of 26001
        (box(10, 30, 0, 18), CAR, 0.6),  # duplicate of 26001 (IoU 0.9)
        (box(10, 30, 34, 54), CAR, 0.7),  # low overlap with 26002 (IoU 320/480)
        (box(40, 60, 0, 30), CAR, 0.95),  # the car group itself: ignored
        (box(40, 60, 18, 38), CAR, 0.5),  # 60 % on the car group
        (box(0, 5, 0, 20), CAR, 0.55),  # 80 % on void
        (box(4, 10, 90, 128), CAR, 0.85),  # all on void
        (box(40, 60, 100, 120), CAR, 0.45),  # on the caravan: not void, a false positive
        (box(40, 60, 40, 50), RIDER, 0.8),  # wrong class on person 24001 (missed)
        (box(40, 48, 60, 68), CAR, 0.65),  # the small car: ignored
        (box(40, 50, 60, 70), CAR, 0.3),  # 64 % on the small car (IoU 0.64)
        (np.zeros((H, W), bool), BUS, 0.99),  # empty: dropped
    ]
    return ids, preds


def scene_with_boundaries() -> tuple[np.ndarray, list[tuple[np.ndarray, int, float]]]:
    ids = np.full((H, W), 7, np.uint16)
    ids[box(10, 40, 10, 30)] = 25_001  # 600 px
    ids[box(10, 40, 40, 60)] = 33_001  # 600 px
    ids[box(45, 64, 0, 40)] = 28_001  # a bus nobody predicts
    ids[box(10, 40, 70, 100)] = 27_001
    ids[box(10, 40, 105, 115)] = 24_002
    ids[box(50, 64, 100, 128)] = PERSON  # person group, 392 px
    ids[box(45, 49, 60, 70)] = RIDER  # rider group of 40 px: also below the 100 px minimum
    ids[box(54, 64, 70, 100)] = 33_002  # 300 px
    preds = [
        (box(10, 40, 10, 30), RIDER, 0.8),  # perfect; same score as the wrong-class rider
        (box(10, 40, 40, 55), BICYCLE, 0.9),  # IoU exactly 0.75
        (box(54, 64, 70, 85), BICYCLE, 0.75),  # IoU exactly 0.5: no match (IoU must exceed t)
        (box(10, 40, 70, 100), TRUCK, 0.5),  # perfect
        (box(45, 55, 50, 60), TRUCK, 0.5),  # false positive with the same score
        (box(10, 40, 105, 115), PERSON, 0.4),  # perfect
        (box(50, 64, 90, 118), PERSON, 0.35),  # 252 of 392 px on the person group
        (box(0, 10, 0, 10), MOTORCYCLE, 0.7),  # a class without ground truth
        # half on the small rider group (IoU 0.5, no match), whose pixels count twice as ignored
        (box(45, 53, 60, 70), RIDER, 0.6),
    ]
    return ids, preds


def random_scene(seed: int) -> tuple[np.ndarray, list[tuple[np.ndarray, int, float]]]:
    """Overlapping instances, groups and void; predictions that are exact, shifted, cropped,
    swapped to another class or random, with tied scores."""
    rng = np.random.default_rng(seed)
    ids = np.full((H, W), 7, np.uint16)
    ids[:5] = 0
    labels = [CAR, PERSON, RIDER, TRUCK, BICYCLE]
    for index in range(1, 12):
        y, x = int(rng.integers(5, 55)), int(rng.integers(0, 118))
        h, w = int(rng.integers(6, 22)), int(rng.integers(6, 30))
        ids[y : y + h, x : x + w] = int(rng.choice(labels)) * 1000 + index
    y, x = int(rng.integers(5, 50)), int(rng.integers(0, 100))
    ids[y : y + 10, x : x + 25] = int(rng.choice([CAR, PERSON]))  # a group region
    scores = np.round(rng.choice([0.2, 0.4, 0.5, 0.6, 0.8, 0.9], size=64), 1).tolist()
    preds = []
    for value in np.unique(ids[ids >= 1000]).tolist():
        mask, label = ids == value, value // 1000
        kind = rng.integers(0, 5)
        if kind == 1:
            mask = np.roll(mask, int(rng.integers(1, 5)), axis=int(rng.integers(0, 2)))
        elif kind == 2:
            rows = np.flatnonzero(mask.any(1))
            mask = mask & (np.arange(H)[:, None] < rows[0] + max(1, len(rows) * 3 // 4))
        elif kind == 3:
            label = int(rng.choice(labels))
        elif kind == 4:
            continue
        preds.append((mask, label, scores.pop()))
        if rng.random() < 0.3:  # a duplicate
            preds.append((np.roll(mask, 1, axis=1), label, scores.pop()))
    for _ in range(4):
        y, x = int(rng.integers(0, 54)), int(rng.integers(0, 110))
        preds.append((box(y, y + 10, x, x + 18), int(rng.choice(labels)), scores.pop()))
    return ids, preds


# --------------------------------------------------------------------------- files and runners
def write_fixture(root: Path, scenes: dict[str, tuple]) -> tuple[dict, list, list, list]:
    """Official files for each scene (name ``<city>_<seq>_<frame>``): the gtFine/leftImg8bit
    tree, the official prediction format (one txt per image: mask PNG, label id, score) and
    COCO results. Returns (converted paths, gt files, prediction txt files, COCO results)."""
    pred_root = root / "results"
    pred_root.mkdir()
    gt_files, txt_files = [], []
    for name, (ids, preds) in scenes.items():
        city = name.split("_")[0]
        for folder, suffix, array in (
            ("gtFine", "gtFine_instanceIds", ids),
            ("leftImg8bit", "leftImg8bit", np.zeros((H, W, 3), np.uint8)),
        ):
            (root / folder / "val" / city).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / "val" / city / f"{name}_{suffix}.png")
        gt_files.append(str(root / "gtFine" / "val" / city / f"{name}_gtFine_instanceIds.png"))
        lines = []
        for k, (mask, label, score) in enumerate(preds):
            Image.fromarray(mask.astype(np.uint8) * 255).save(pred_root / f"{name}_{k}.png")
            lines.append(f"{name}_{k}.png {label} {score!r}\n")
        txt_files.append(str(pred_root / f"{name}_pred.txt"))
        Path(txt_files[-1]).write_text("".join(lines))
    paths = convert_cityscapes(root, root / "coco")
    image_ids = {_stem(i["file_name"]): i["id"] for i in _load_json(paths["val_json"])["images"]}
    results = [
        {"image_id": image_ids[name], "category_id": label, "score": score, "segmentation": rle}
        for name, (_, preds) in scenes.items()
        for mask, label, score in preds
        for rle in [_encode(mask)]
    ]
    return paths, gt_files, txt_files, results


def _stem(file_name: str) -> str:
    return file_name.split("/")[1][: -len("_leftImg8bit.png")]


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def run_official(root: Path, gt_files: list, txt_files: list, monkeypatch) -> dict:
    """The official script's ``averages``: allAp, allAp50%, classes[name][ap, ap50%] in [0, 1]."""
    cs_eval = official_evaluation()
    # numpy 2.4 removed np.in1d, which the script (2.3.0) still calls for its void mask
    monkeypatch.setattr(np, "in1d", lambda a, b: np.isin(a, b).ravel(), raising=False)
    # it dumps its ground-truth cache and matches.json (debug files, not part of the metric) with a
    # JSON encoder that fails on numpy 2 integers: write nothing
    monkeypatch.setattr(cs_eval, "writeDict2JSON", lambda *args: None)
    args = copy.copy(cs_eval.args)
    args.gtInstancesFile = str(root / "gtInstances.json")  # never written: no stale cache
    args.predictionPath = os.path.abspath(root / "results")  # as the script forms its paths
    args.JSONOutput, args.quiet, args.distanceAvailable = False, True, False
    return cs_eval.evaluateImgLists(txt_files, gt_files, args)["averages"]


def assert_same(ours: dict, theirs: dict) -> None:
    pairs = [(ours["AP"], theirs["allAp"]), (ours["AP50"], theirs["allAp50%"])]
    for name in NAMES.values():
        official = theirs["classes"][name]
        pairs += [(ours["per_class"][name]["AP"], official["ap"])]
        pairs += [(ours["per_class"][name]["AP50"], official["ap50%"])]
    for mine, official in pairs:
        if math.isnan(official):
            assert math.isnan(mine)
        else:
            assert mine == pytest.approx(100 * official, abs=1e-6)


# --------------------------------------------------------------------------- tests
def test_matches_the_official_script(tmp_path, monkeypatch):
    scenes = {
        "frankfurt_000000_000001": scene_with_every_case(),
        "frankfurt_000000_000002": scene_with_boundaries(),
        "lindau_000000_000001": random_scene(1),
        "lindau_000000_000002": random_scene(2),
        "lindau_000000_000003": random_scene(3),
    }
    paths, gt_files, txt_files, results = write_fixture(tmp_path, scenes)
    ours = evaluate_cityscapes(paths["val_json"], results)
    theirs = run_official(tmp_path, gt_files, txt_files, monkeypatch)
    assert_same(ours, theirs)
    # the fixture reaches every branch: a class with AP 0 (bus: ground truth, no prediction),
    # NaN (motorcycle, train: no ground truth) and AP between 0 and 100
    assert ours["per_class"]["bus"] == {"AP": 0.0, "AP50": 0.0}
    assert math.isnan(ours["per_class"]["motorcycle"]["AP"])
    assert math.isnan(ours["per_class"]["train"]["AP50"])
    assert 0 < ours["per_class"]["car"]["AP"] < ours["per_class"]["car"]["AP50"] < 100


def test_only_the_scenes_with_every_case(tmp_path, monkeypatch):
    scenes = {
        "frankfurt_000000_000001": scene_with_every_case(),
        "frankfurt_000000_000002": scene_with_boundaries(),
    }
    paths, gt_files, txt_files, results = write_fixture(tmp_path, scenes)
    ours = evaluate_cityscapes(paths["val_json"], results)
    assert_same(ours, run_official(tmp_path, gt_files, txt_files, monkeypatch))


def _single_car_gt(tmp_path: Path, preds: list) -> tuple[dict, list]:
    ids = np.full((H, W), 7, np.uint16)
    ids[0:4] = 0
    ids[box(10, 30, 10, 30)] = 26_001
    paths, _, _, results = write_fixture(tmp_path, {"aachen_000000_000001": (ids, preds)})
    return paths, results


def test_hand_computed_precision_recall(tmp_path):
    # TP at 0.9 below a false positive at 0.95: points (recall 0, precision 0) at 0.95,
    # (1, 0.5) at 0.9, then (0, 1): trapezoids 1 * (0.5 + 0) / 2 + 0 = 0.25 at every threshold
    paths, results = _single_car_gt(
        tmp_path, [(box(10, 30, 10, 30), CAR, 0.9), (box(40, 60, 40, 60), CAR, 0.95)]
    )
    metrics = evaluate_cityscapes(paths["val_json"], results)
    assert metrics["per_class"]["car"] == {"AP": 25.0, "AP50": 25.0}
    assert metrics["AP"] == 25.0 and metrics["AP50"] == 25.0
    assert math.isnan(metrics["per_class"]["person"]["AP"])


def test_lower_scored_false_positive_costs_nothing(tmp_path):
    # (0.5, 1) at 0.8, (1, 1) at 0.9, then (0, 1): area 1
    paths, results = _single_car_gt(
        tmp_path, [(box(10, 30, 10, 30), CAR, 0.9), (box(40, 60, 40, 60), CAR, 0.8)]
    )
    assert evaluate_cityscapes(paths["val_json"], results)["AP"] == 100.0


def test_all_predictions_ignored_differs_from_the_official_script(tmp_path, monkeypatch):
    """The one case where the definitions part: a class with ground truth whose predictions are all
    ignored (here on void) leaves no point on its curve; the official script then fails with an
    IndexError, we give AP 0 (no instance was found)."""
    ids = np.full((H, W), 7, np.uint16)
    ids[0:4] = 0
    ids[box(10, 30, 10, 30)] = 26_001
    preds = [(box(0, 4, 0, 20), CAR, 0.9)]
    paths, gt_files, txt_files, results = write_fixture(
        tmp_path, {"aachen_000000_000001": (ids, preds)}
    )
    assert evaluate_cityscapes(paths["val_json"], results)["per_class"]["car"]["AP"] == 0.0
    with pytest.raises(IndexError):
        run_official(tmp_path, gt_files, txt_files, monkeypatch)


def test_no_results_and_bad_inputs(tmp_path):
    paths, results = _single_car_gt(tmp_path, [(box(10, 30, 10, 30), CAR, 0.9)])
    gt = _load_json(paths["val_json"])
    empty = evaluate_cityscapes(gt, [])
    assert empty["AP"] == 0.0 and empty["per_class"]["car"] == {"AP": 0.0, "AP50": 0.0}
    bad = [
        ([{**results[0], "image_id": 99}], "image_id 99, not in ground truth"),
        ([{**results[0], "category_id": 29}], "unknown category_id 29"),
        ([{**results[0], "score": math.nan}], "expected a finite number"),
        ([{**results[0], "segmentation": _encode(np.zeros((H, W + 1), bool))}], "!= image size"),
        ([{k: v for k, v in results[0].items() if k != "score"}], r"missing key\(s\) \['score'\]"),
    ]
    for dets, message in bad:
        with pytest.raises(EvaluationError, match=message):
            evaluate_cityscapes(gt, dets)
    no_void = {**gt, "images": [{k: v for k, v in gt["images"][0].items() if "void" not in k}]}
    with pytest.raises(EvaluationError, match="has no \\['void_segmentation'\\]"):
        evaluate_cityscapes(no_void, results)
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_cityscapes(tmp_path / "missing.json", results)


def test_eval_cli_adds_the_official_metric_for_cityscapes_files(tmp_path, capsys):
    from dynaseg.cli import main

    paths, results = _single_car_gt(
        tmp_path, [(box(10, 30, 10, 30), CAR, 0.9), (box(40, 60, 40, 60), CAR, 0.95)]
    )
    for r in results:  # COCO's bbox AP needs boxes
        r["bbox"] = mask_utils.toBbox(
            {**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}
        ).tolist()
    (tmp_path / "r.json").write_text(json.dumps(results))
    args = ["eval", "--gt", str(paths["val_json"]), "--results", str(tmp_path / "r.json")]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cityscapes"] == {"AP": 25.0, "AP50": 25.0}
    assert set(out) == {"bbox", "segm", "cityscapes"}
    assert main([*args, "--iou-types", "bbox", "--json"]) == 0  # no masks evaluated: no metric
    assert "cityscapes" not in json.loads(capsys.readouterr().out)
