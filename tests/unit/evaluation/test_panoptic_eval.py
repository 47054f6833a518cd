"""COCO panoptic quality: hand-computed fixtures, and the COCO panoptic API as oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from panoptic_cases import CAT, CATEGORIES, DOG, GRASS, SKY, base_gt, check, pq, seg, write_panoptic

from dynaseg.evaluation.panoptic import PanopticEvalError, PQAccumulator, pq_compute


# --------------------------------------------------------------------------- hand-computed cases
def test_perfect_prediction_is_100_and_empty_categories_are_excluded():
    gt, segs = base_gt()
    pred = gt * 7 + 100  # other ids, same segments
    pred_segs = [{"id": s["id"] * 7 + 100, "category_id": s["category_id"]} for s in segs]
    m = pq(gt, segs, pred, pred_segs)
    check(m["All"], 1, 1, 1, N=3)
    check(m["Things"], 1, 1, 1, N=1)
    check(m["Stuff"], 1, 1, 1, N=2)
    assert set(m) == {"All", "Things", "Stuff", "per_class"}
    assert list(m["per_class"]) == ["cat", "dog", "sky", "grass"]
    assert m["per_class"]["cat"]["isthing"] is True and m["per_class"]["sky"]["isthing"] is False
    assert all(math.isnan(m["per_class"]["dog"][k]) for k in ("PQ", "SQ", "RQ"))  # no gt, no pred


def test_missed_thing_is_a_false_negative():
    gt, segs = base_gt()
    pred = gt.copy()
    pred[pred == 4] = 0  # cat B not predicted (void)
    m = pq(gt, segs, pred, [s for s in segs if s["id"] != 4])
    check(m["per_class"]["cat"], 2 / 3, 1, 2 / 3)  # TP IoU 1, one FN: 1 / (1 + 0.5)
    check(m["Things"], 2 / 3, 1, 2 / 3, N=1)
    check(m["Stuff"], 1, 1, 1, N=2)
    check(m["All"], (2 / 3 + 2) / 3, 1, (2 / 3 + 2) / 3, N=3)

    pred[pred == 0] = 2  # cat B predicted as grass instead: grass IoU 30 / 40
    m = pq(gt, segs, pred, [s for s in segs if s["id"] != 4])
    check(m["per_class"]["grass"], 0.75, 0.75, 1)
    check(m["All"], (2 / 3 + 1 + 0.75) / 3, (1 + 1 + 0.75) / 3, (2 / 3 + 2) / 3, N=3)


def test_false_positive_of_a_category_without_ground_truth():
    gt, segs = base_gt()
    pred = gt.copy()
    pred[0:1, :] = 9  # a dog over 10 sky pixels; sky IoU 30 / 40
    m = pq(gt, segs, pred, segs + [seg(9, DOG)])
    check(m["per_class"]["dog"], 0, 0, 0)
    check(m["per_class"]["sky"], 0.75, 0.75, 1)
    check(m["Things"], 0.5, 0.5, 0.5, N=2)
    check(m["All"], 2.75 / 4, 2.75 / 4, 3 / 4, N=4)


def test_iou_of_exactly_one_half_is_no_match():
    gt, segs = base_gt()
    pred = gt.copy()
    pred[4:8, 5:] = 3  # cat A takes 20 grass pixels: IoU 20 / 40; grass keeps 10 of 30: IoU 1/3
    m = pq(gt, segs, pred, segs)
    check(m["per_class"]["cat"], 0.5, 1, 0.5)  # B: TP; A: FN and its prediction a FP
    check(m["per_class"]["grass"], 0, 0, 0)
    check(m["All"], 1.5 / 3, 2 / 3, 1.5 / 3, N=3)


def test_iou_union_leaves_out_predicted_pixels_on_void():
    gt = np.zeros(
        (10, 10), np.int64
    )  # sky rows 0-3, cat rows 4-7 cols 0-4, grass rows 4-7 cols 5-9, void rows 8-9
    gt[0:4] = 1
    gt[4:8, :5] = 3
    gt[4:8, 5:] = 2
    segs = [seg(1, SKY), seg(2, GRASS), seg(3, CAT)]
    pred = gt.copy()
    pred[8:10] = (
        3  # the cat also covers all 20 void pixels: 20 / (40 + 20 - 20 - 20) = 1, not 20 / 40
    )
    m = pq(gt, segs, pred, segs)
    check(m["per_class"]["cat"], 1, 1, 1)
    check(m["All"], 1, 1, 1, N=3)


def test_false_positive_mostly_on_void_is_ignored_and_half_on_void_is_counted():
    gt = np.zeros((10, 10), np.int64)
    gt[0:4] = 1
    gt[4:8, :5] = 3
    gt[4:8, 5:] = 2
    segs = [seg(1, SKY), seg(2, GRASS), seg(3, CAT)]
    pred = gt.copy()
    pred[8:10, 0:6] = 9  # 12 void pixels
    pred[7, 5:] = 9  # + 5 grass pixels: 12 / 17 on void > 0.5 -> not a FP; grass IoU 15 / 20
    m = pq(gt, segs, pred, segs + [seg(9, DOG)])
    assert math.isnan(m["per_class"]["dog"]["PQ"])
    check(m["per_class"]["grass"], 0.75, 0.75, 1)
    check(m["All"], 2.75 / 3, 2.75 / 3, 1, N=3)

    pred = gt.copy()
    pred[8, 0:5] = 9  # 5 void pixels
    pred[7, 5:] = 9  # + 5 grass pixels: exactly half on void -> a FP
    m = pq(gt, segs, pred, segs + [seg(9, DOG)])
    check(m["per_class"]["dog"], 0, 0, 0)
    check(m["All"], 2.75 / 4, 2.75 / 4, 3 / 4, N=4)


def crowd_gt() -> tuple[np.ndarray, list[dict]]:
    """Like base_gt but cat B (rows 8-9 cols 0-4, 10 px) is a crowd region."""
    gt, segs = base_gt()
    return gt, [seg(1, SKY), seg(2, GRASS), seg(3, CAT), seg(4, CAT, iscrowd=1)]


@pytest.mark.parametrize("category, fp", [(CAT, 0), (DOG, 1)])
def test_crowd_region_is_never_a_false_negative_and_excuses_its_own_category(category, fp):
    gt, segs = crowd_gt()
    pred = gt.copy()
    pred[9, 5:7] = 4  # the crowd area plus 2 grass pixels: 10 / 12 on the crowd; grass IoU 28 / 30
    m = pq(gt, segs, pred, [s for s in segs if s["id"] != 4] + [seg(4, category)])
    check(m["per_class"]["cat"], 1, 1, 1)  # A matched; the crowd is no FN and the cat on it no FP
    if fp:
        check(m["per_class"]["dog"], 0, 0, 0)  # crowd of another category does not excuse a dog
    else:
        assert math.isnan(m["per_class"]["dog"]["PQ"])
    grass = 28 / 30
    check(m["All"], (2 + grass) / (3 + fp), (2 + grass) / (3 + fp), 3 / (3 + fp), N=3 + fp)


def test_prediction_equal_to_a_crowd_region_is_not_a_true_positive():
    gt, segs = crowd_gt()
    m = pq(gt, segs, gt, [seg(1, SKY), seg(2, GRASS), seg(3, CAT), seg(4, CAT)])
    check(m["per_class"]["cat"], 1, 1, 1)  # only A counts: TP = 1, crowd matched with nothing


def test_stuff_only_and_thing_only_splits():
    gt = np.ones((6, 6), np.int64)
    gt[3:] = 2
    segs = [seg(1, SKY), seg(2, GRASS)]
    m = pq(gt, segs, gt, segs)
    check(m["Stuff"], 1, 1, 1, N=2)
    check(m["All"], 1, 1, 1, N=2)
    assert m["Things"]["N"] == 0 and all(math.isnan(m["Things"][k]) for k in ("PQ", "SQ", "RQ"))

    gt = np.zeros((6, 6), np.int64)
    gt[:2, :2], gt[3:, 3:] = 5, 6  # a cat and a dog on void
    pred = gt.copy()
    pred[3, 3:] = 0  # dog IoU 6 / 9
    m = pq(gt, [seg(5, CAT), seg(6, DOG)], pred, [seg(5, CAT), seg(6, DOG)])
    check(m["Things"], (1 + 2 / 3) / 2, (1 + 2 / 3) / 2, 1, N=2)
    assert m["Stuff"]["N"] == 0 and math.isnan(m["Stuff"]["PQ"])


def test_counts_accumulate_over_images():
    gt, segs = base_gt()
    pred = gt.copy()
    pred[pred == 4] = 0
    acc = PQAccumulator(categories=CATEGORIES)
    acc.add_image(
        gt_ids=torch.from_numpy(gt),
        gt_segments=segs,
        pred_ids=torch.from_numpy(gt),
        pred_segments=segs,
    )
    acc.add_image(gt_ids=gt, gt_segments=segs, pred_ids=pred, pred_segments=segs[:3])
    m = acc.result()
    check(m["per_class"]["cat"], 3 / 3.5, 1, 3 / 3.5)  # TP 3 (IoU sum 3), FN 1 over both images
    assert acc.counts[CAT].tp == 3 and acc.counts[CAT].fn == 1


def test_ground_truth_area_from_json_is_used_like_the_api():
    gt, segs = base_gt()
    pred = gt.copy()
    pred[pred == 4] = 3  # cat A predicted over A and B: IoU 20 / 30 with the true area
    m = pq(gt, segs, pred, segs[:3])
    check(m["per_class"]["cat"], (2 / 3) / 1.5, 2 / 3, 1 / 1.5)
    listed = [{**s, "area": 10} if s["id"] == 3 else s for s in segs]
    m = pq(gt, listed, pred, segs[:3])  # the (wrong) listed area wins: 20 / (30 + 10 - 20) = 1
    check(m["per_class"]["cat"], 1 / 1.5, 1, 1 / 1.5)


def test_in_memory_errors():
    gt, segs = base_gt()
    with pytest.raises(PanopticEvalError, match="size"):
        pq(gt, segs, gt[:5], segs)
    with pytest.raises(PanopticEvalError, match="segment id 4 that is not in its segments_info"):
        pq(gt, segs, gt, segs[:3])
    with pytest.raises(
        PanopticEvalError, match=r"\[4\] are in segments_info but not in the prediction PNG"
    ):
        pq(gt, segs, np.where(gt == 4, 3, gt), segs)
    with pytest.raises(PanopticEvalError, match="unknown category_id 77"):
        pq(gt, segs, gt, segs[:3] + [seg(4, 77)])
    with pytest.raises(PanopticEvalError, match="listed twice"):
        pq(gt, segs, gt, segs + [seg(4, CAT)])
    with pytest.raises(PanopticEvalError, match="ground-truth PNG has segment id 4"):
        pq(gt, segs[:3], gt, segs)


# --------------------------------------------------------------------------- oracle: the COCO panoptic API
def random_fixture(rng: np.random.Generator, n_images: int, H: int = 24, W: int = 32):
    """Ground truth and a noisy prediction per image: stuff bands, thing boxes, crowds, void."""
    images = []
    for _ in range(n_images):
        boxes = []
        for _ in range(rng.integers(2, 7)):
            y0, x0 = rng.integers(0, H - 3), rng.integers(0, W - 3)
            h, w = rng.integers(3, 12), rng.integers(3, 14)
            boxes.append((y0, x0, h, w, int(rng.choice([CAT, DOG])), int(rng.random() < 0.2)))

        def paint(jitter: int, drop: float, relabel: float, extra: int, void_band: bool):
            ids = np.zeros((H, W), np.int64)
            cats: dict[int, tuple[int, int]] = {}
            split = H // 2 + int(rng.integers(-jitter - 1, jitter + 2))
            ids[:split], ids[split:] = 1, 2
            cats[1], cats[2] = (SKY, 0), (GRASS, 0)
            nxt = 3
            todo = list(boxes) + [
                (
                    rng.integers(0, H - 2),
                    rng.integers(0, W - 2),
                    rng.integers(2, 8),
                    rng.integers(2, 8),
                    int(rng.choice([CAT, DOG])),
                    0,
                )
                for _ in range(extra)
            ]
            for y0, x0, h, w, c, crowd in todo:
                if rng.random() < drop:
                    continue
                dy, dx = rng.integers(-jitter, jitter + 1, size=2)
                if rng.random() < relabel:
                    c = CAT + DOG - c
                ids[max(0, y0 + dy) : y0 + dy + h, max(0, x0 + dx) : x0 + dx + w] = nxt
                cats[nxt] = (c, crowd)
                nxt += 1
            if void_band:
                r = int(rng.integers(0, H - 4))
                ids[r : r + int(rng.integers(1, 4))] = 0
            present, area = np.unique(ids, return_counts=True)
            segments = [
                {
                    "id": int(i),
                    "category_id": cats[int(i)][0],
                    "iscrowd": cats[int(i)][1],
                    "area": int(a),
                }
                for i, a in zip(present, area)
                if i != 0
            ]
            return ids, segments

        gt_ids, gt_segs = paint(0, 0.0, 0.0, 0, void_band=rng.random() < 0.7)
        pred_ids, pred_segs = paint(
            2, 0.2, 0.15, int(rng.integers(0, 3)), void_band=rng.random() < 0.5
        )
        for s in pred_segs:
            del s["iscrowd"]
        x0 = int(rng.integers(0, W - 6))
        on_void = (gt_ids == 0) & (np.arange(W) >= x0) & (np.arange(W) < x0 + 6)
        if on_void.sum() >= 3:  # a prediction lying (mostly) on gt void
            on_void[:, x0 + 5] |= rng.random() < 0.5  # sometimes with a column off the void
            new_id = int(pred_ids.max()) + 1
            pred_ids[on_void] = new_id
            pred_segs = [s for s in pred_segs if (pred_ids == s["id"]).any()]
            pred_segs.append({"id": new_id, "category_id": int(rng.choice([CAT, DOG, SKY]))})
        offset = int(rng.integers(0, 256**3 - 64))  # exercise all three PNG channels
        pred_ids = np.where(pred_ids > 0, pred_ids + offset, 0)
        for s in pred_segs:
            s["id"] += offset
        images.append((gt_ids, gt_segs, pred_ids, pred_segs))
    return images


def test_matches_the_coco_panoptic_api(tmp_path, capsys):
    try:
        from panopticapi.evaluation import pq_compute as api_pq_compute
    except ImportError as e:  # fail, never skip: `make install` installs the test-only oracle
        pytest.fail(
            f"oracle not installed ({e}); `make install` runs: "
            "pip install --no-deps panopticapi-lite==0.2.0"
        )
    images = random_fixture(np.random.default_rng(0), n_images=12)
    gt_json, gt_dir = write_panoptic(
        tmp_path, "gt", [(i + 1, g, gs) for i, (g, gs, _, _) in enumerate(images)]
    )
    pred_json, pred_dir = write_panoptic(
        tmp_path, "pred", [(i + 1, p, ps) for i, (_, _, p, ps) in enumerate(images)]
    )
    ours = pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    theirs = api_pq_compute(str(gt_json), str(pred_json), str(gt_dir), str(pred_dir))
    capsys.readouterr()
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["N"] == theirs[group]["n"]
        for k in ("PQ", "SQ", "RQ"):
            assert ours[group][k] == pytest.approx(100 * theirs[group][k.lower()], abs=1e-9)
    assert (
        ours["All"]["N"] == 4 and 20 < ours["All"]["PQ"] < 90
    )  # a fixture that exercises matching
    for cat in CATEGORIES:
        mine = ours["per_class"][cat["name"]]
        if not math.isnan(mine["PQ"]):
            for k in ("PQ", "SQ", "RQ"):
                assert mine[k] == pytest.approx(
                    100 * theirs["per_class"][cat["id"]][k.lower()], abs=1e-9
                )
