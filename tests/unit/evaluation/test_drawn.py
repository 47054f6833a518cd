"""The drawn-instance check (``dynaseg eval --drawn-at``) on hand-made masks."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dynaseg.cli import main
from dynaseg.evaluation.drawn import drawn_agreement, format_drawn_agreement
from dynaseg.evaluation.inputs import EvaluationError

H, W = 40, 60


def _box_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _rle(m):
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


def _poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


GT = {
    "images": [
        {"id": 7, "width": W, "height": H, "file_name": "a.png"},
        {"id": 9, "width": W, "height": H, "file_name": "sub/b.png"},
    ],
    "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    "annotations": [
        # image 7: two class-1 objects (one as a polygon), one class-2 object, one crowd region
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
         "segmentation": _poly(0, 0, 10, 10), "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [20, 0, 10, 10], "area": 100,
         "segmentation": _rle(_box_mask(20, 0, 30, 10)), "iscrowd": 0},
        {"id": 3, "image_id": 7, "category_id": 2, "bbox": [40, 0, 10, 10], "area": 100,
         "segmentation": _rle(_box_mask(40, 0, 50, 10)), "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 2, "bbox": [0, 20, 20, 20], "area": 400,
         "segmentation": _rle(_box_mask(0, 20, 20, 40)), "iscrowd": 1},
        # image 9: one object nothing is drawn on
        {"id": 5, "image_id": 9, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100,
         "segmentation": _rle(_box_mask(0, 0, 10, 10)), "iscrowd": 0},
    ],
}  # fmt: skip


def _det(mask, cls, score, image_id=7, **extra):
    return {"image_id": image_id, "category_id": cls, "score": score,
            "bbox": [0, 0, 1, 1], "segmentation": _rle(mask), **extra}  # fmt: skip


RESULTS = [
    _det(_box_mask(0, 0, 10, 10), 1, 0.9),  # right: object 1
    _det(_box_mask(0, 0, 10, 9), 1, 0.8),  # duplicate of object 1 (taken): not right
    _det(_box_mask(20, 0, 30, 10), 2, 0.7),  # object 2 under the wrong class
    _det(_box_mask(21, 0, 30, 10), 1, 0.6),  # object 2, right class, IoU 0.9: right
    _det(_box_mask(40, 0, 47, 10), 2, 0.5),  # object 3 at IoU 0.7: right
    _det(_box_mask(40, 0, 44, 10), 2, 0.45),  # object 3 at IoU 0.4 only (and taken): not right
    _det(_box_mask(0, 20, 20, 40), 1, 0.6),  # on the crowd region only: not counted
    _det(_box_mask(50, 30, 60, 40), 1, 0.5),  # background: not right
    _det(_box_mask(0, 0, 10, 10), 2, 0.2, image_id=9),  # right, but below the threshold
]


def test_counts_right_drawn_and_found_objects():
    report = drawn_agreement(GT, RESULTS, score_threshold=0.3)
    # Drawn and counted: 8 at >= 0.3, less the crowd one. Right: objects 1, 2 and 3 once each.
    assert {k: report[k] for k in ("drawn", "right", "objects", "found")} == {
        "drawn": 7,
        "right": 3,
        "objects": 4,
        "found": 3,
    }
    assert report["right_fraction"] == pytest.approx(3 / 7)
    assert report["found_fraction"] == pytest.approx(3 / 4)
    # At 0.1 the class-2 detection on image 9 is drawn and finds the last object.
    low = drawn_agreement(GT, RESULTS, score_threshold=0.1)
    assert (low["drawn"], low["right"], low["found"]) == (8, 4, 4)
    # A stricter IoU loses object 3 (matched at 0.7) and the shrunken match of object 2 (0.9 stays).
    strict = drawn_agreement(GT, RESULTS, score_threshold=0.3, iou_threshold=0.8)
    assert (strict["right"], strict["found"]) == (2, 2)
    text = format_drawn_agreement(report)
    assert "43 % of 7 drawn instances" in text and "75 % of 4 objects" in text


def test_objects_not_found_are_put_under_the_first_reason_that_holds():
    # At 0.3 only image 9's object is missed, and its own class scores 0.2 on it.
    report = drawn_agreement(GT, RESULTS, score_threshold=0.3)
    assert report["not_found"] == {"other_class": 0, "below_threshold": 1, "no_match": 0}
    assert (
        "objects not found: 0 drawn with another class, 1 with their class below 0.3, 0 neither"
        in format_drawn_agreement(report)
    )
    # At 0.65 object 2 shows only the class-2 instance (0.7): "other class" comes before its own
    # class's 0.6; object 3's own class (0.5) and image 9's (0.2) are below the threshold.
    high = drawn_agreement(GT, RESULTS, score_threshold=0.65)
    assert high["found"] == 1
    assert high["not_found"] == {"other_class": 1, "below_threshold": 2, "no_match": 0}
    # At IoU 0.8 nothing of object 3's class matches it closely enough (0.7 and 0.4).
    strict = drawn_agreement(GT, RESULTS, score_threshold=0.3, iou_threshold=0.8)
    assert strict["not_found"] == {"other_class": 0, "below_threshold": 1, "no_match": 1}
    # Results with nothing below the threshold (predict's) cannot tell a low score from a miss.
    drawn_only = drawn_agreement(GT, RESULTS[:6], score_threshold=0.45)
    assert drawn_only["not_found"] == {"other_class": 0, "below_threshold": None, "no_match": 1}
    assert "1 with no match drawn (results below 0.45 would tell" in format_drawn_agreement(
        drawn_only
    )
    assert drawn_agreement(GT, RESULTS, score_threshold=0.1)["not_found"] == {
        "other_class": 0,
        "below_threshold": None,  # nothing scores under 0.1
        "no_match": 0,
    }


def test_predict_results_are_matched_by_file_name():
    # predict numbers images 1, 2, ... in folder order and records the file name
    names = {7: (1, "a.png"), 9: (2, "b.png")}
    moved = [
        {**r, "image_id": names[r["image_id"]][0], "file_name": names[r["image_id"]][1]}
        for r in RESULTS
    ]
    assert drawn_agreement(GT, moved, score_threshold=0.1)["found"] == 4
    with pytest.raises(EvaluationError, match="'c.png', which is not an image"):
        drawn_agreement(GT, [{**moved[0], "file_name": "c.png"}], score_threshold=0.3)
    same_name = {**GT, "images": [GT["images"][0], {**GT["images"][1], "file_name": "x/a.png"}]}
    with pytest.raises(EvaluationError, match="'a.png', a name several ground-truth images share"):
        drawn_agreement(same_name, moved, score_threshold=0.3)


def test_eval_cli_drawn_at(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "r.json").write_text(json.dumps(RESULTS))
    args = ["eval", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "r.json")]
    assert main([*args, "--drawn-at", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["drawn"] and out["drawn"]["right"] == 3
    (tmp_path / "bad.json").write_text(json.dumps([{**RESULTS[0], "score": "high"}]))
    bad = ["eval", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "bad.json")]
    assert main([*bad, "--drawn-at", "0.3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynaseg: error: results file") and "score" in err
    for score in ("nan", "1.5"):
        assert main([*args, "--drawn-at", score]) == 2
        assert "--drawn-at must be a score in [0, 1]" in capsys.readouterr().err
