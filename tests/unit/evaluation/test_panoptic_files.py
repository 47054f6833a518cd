"""COCO panoptic quality from files: the CLI, file errors, and writing predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from panoptic_cases import CAT, CATEGORIES, DOG, GRASS, SKY, base_gt, check, pq, seg, write_panoptic
from PIL import Image

from dynaseg.cli import main
from dynaseg.evaluation.panoptic import (
    PanopticEvalError,
    format_panoptic_table,
    pq_compute,
    pq_compute_arrays,
)
from dynaseg.evaluation.panoptic_io import panoptic_to_coco, write_panoptic_predictions
from dynaseg.structures.panoptic import PanopticSegmentation, Segment, id_to_rgb, rgb_to_id


@pytest.fixture
def files(tmp_path):
    gt, segs = base_gt()
    pred = gt.copy()
    pred[pred == 4] = 0
    gt_json, gt_dir = write_panoptic(tmp_path, "gt", [(1, gt, segs), (2, gt, segs)])
    big = 70000 + 256 * 256 * 3  # ids using all three PNG channels
    pred2 = np.where(pred > 0, pred + big, 0)
    pred_json, pred_dir = write_panoptic(
        tmp_path,
        "pred",
        [
            (2, pred2, [{"id": s["id"] + big, "category_id": s["category_id"]} for s in segs[:3]]),
            (1, gt, segs),
        ],
        categories=None,
    )
    return gt_json, gt_dir, pred_json, pred_dir


def test_files_match_in_memory_result(files):
    gt, segs = base_gt()
    pred = gt.copy()
    pred[pred == 4] = 0
    expected = pq_compute_arrays(
        [(gt, segs, gt, segs), (gt, segs, pred, segs[:3])], categories=CATEGORIES
    )
    got = pq_compute(*files)
    for group in ("All", "Things", "Stuff"):
        assert got[group] == pytest.approx(expected[group])
    check(got["per_class"]["cat"], 3 / 3.5, 1, 3 / 3.5)


def _eval_args(files) -> list[str]:
    """``dynaseg eval --panoptic`` on the ground truth and prediction files of the fixture."""
    gt_json, gt_dir, pred_json, pred_dir = files
    return [
        "eval",
        "--panoptic",
        "--gt-json",
        str(gt_json),
        "--gt-dir",
        str(gt_dir),
        "--pred-json",
        str(pred_json),
        "--pred-dir",
        str(pred_dir),
    ]


def test_cli_json_prints_one_object_of_the_fixed_shape(files, capsys):
    rc = main(_eval_args(files) + ["--json"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)  # exactly one JSON object, strict (no NaN)
    assert set(data) == {"All", "Things", "Stuff", "per_class"}
    for group in ("All", "Things", "Stuff"):
        assert set(data[group]) == {"PQ", "SQ", "RQ", "N"} and isinstance(data[group]["N"], int)
    assert data["All"]["N"] == 3 and data["Things"]["PQ"] == pytest.approx(300 / 3.5)
    assert data["per_class"]["dog"] == {"PQ": None, "SQ": None, "RQ": None, "isthing": True}
    assert set(data["per_class"]["cat"]) == {"PQ", "SQ", "RQ", "isthing"}


def test_cli_table_and_missing_companions(files, capsys):
    gt_json, gt_dir = files[:2]
    rc = main(_eval_args(files))
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0].split() == ["PQ", "SQ", "RQ", "N"]
    assert "Things" in out and "grass" in out and " 85.7" in out
    rc = main(["eval", "--panoptic", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--json"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "--pred-json, --pred-dir" in captured.err
    rc = main(["eval", "--gt-json", str(gt_json)])
    assert rc == 2 and "go with --panoptic" in capsys.readouterr().err


def test_format_table_marks_undefined_numbers():
    gt = np.ones((4, 4), np.int64)
    text = format_panoptic_table(pq(gt, [seg(1, SKY)], gt, [seg(1, SKY)]))
    things = next(line for line in text.splitlines() if line.startswith("Things"))
    assert things.split() == ["Things", "-", "-", "-", "0"]
    assert "sky" in text and "stuff" in text


def _edit_pred(pred_json: Path, fn) -> None:
    data = json.loads(pred_json.read_text())
    fn(data)
    pred_json.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("json_id_not_in_png", r"\[99\] are in segments_info but not in the prediction PNG"),
        ("png_id_not_in_json", "prediction PNG has segment id 4 that is not in its segments_info"),
        ("unknown_category", "unknown category_id 42"),
        ("missing_image", "has no annotation for image_id 2"),
        ("size_mismatch", "prediction size 10x5"),
        ("malformed_json", "not valid JSON"),
        ("missing_png", "does not exist"),
    ],
)
def test_file_errors_name_the_file(files, case, pattern):
    gt_json, gt_dir, pred_json, pred_dir = files
    named = pred_json
    if case == "json_id_not_in_png":
        _edit_pred(pred_json, lambda d: d["annotations"][1]["segments_info"].append(seg(99, DOG)))
    elif case == "png_id_not_in_json":
        _edit_pred(pred_json, lambda d: d["annotations"][1]["segments_info"].pop())
    elif case == "unknown_category":
        _edit_pred(
            pred_json, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=42)
        )
    elif case == "missing_image":
        _edit_pred(pred_json, lambda d: d["annotations"].pop(0))
    elif case == "size_mismatch":
        Image.fromarray(id_to_rgb(base_gt()[0][:5])).save(pred_dir / "000001.png")
        named = pred_dir / "000001.png"
    elif case == "malformed_json":
        pred_json.write_text('{"annotations": [')
    elif case == "missing_png":
        (pred_dir / "000002.png").unlink()
        named = pred_dir / "000002.png"
    with pytest.raises(PanopticEvalError, match=pattern) as e:
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    assert str(named) in str(e.value) and "\n" not in str(e.value)


def test_ground_truth_errors_name_the_file(files, tmp_path):
    gt_json, gt_dir, pred_json, pred_dir = files
    data = json.loads(gt_json.read_text())
    del data["categories"]
    gt_json.write_text(json.dumps(data))
    with pytest.raises(PanopticEvalError, match="missing 'categories' list") as e:
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    assert str(gt_json) in str(e.value)
    gt_json.write_text(json.dumps({**data, "categories": CATEGORIES}))
    with pytest.raises(PanopticEvalError, match="does not exist"):
        pq_compute(gt_json, tmp_path / "nowhere", pred_json, pred_dir)


# --------------------------------------------------------------------------- writing predictions
def test_panoptic_to_coco_and_write_round_trip(tmp_path):
    gt, segs = base_gt()
    gt_json, gt_dir = write_panoptic(tmp_path, "gt", [(1, gt, segs)])
    # Same segmentation with other ids and contiguous labels: things [cat, dog], stuff [sky, grass].
    ids = torch.from_numpy(gt * 10).to(torch.int32)
    pan = PanopticSegmentation(
        ids=ids,
        segments=[
            Segment(id=10, label=0, isthing=False, score=1.0, area=40),
            Segment(id=20, label=1, isthing=False, score=1.0, area=30),
            Segment(id=30, label=0, isthing=True, score=0.9, area=20),
            Segment(id=40, label=0, isthing=True, score=0.7, area=10),
            Segment(id=50, label=1, isthing=True, score=0.2, area=0),  # no pixels: left out
        ],
    )
    png, ann = panoptic_to_coco(
        pan,
        image_id=1,
        file_name="sub/000001.jpg",
        thing_category_ids=[CAT, DOG],
        stuff_category_ids=[SKY, GRASS],
    )
    assert png.dtype == np.uint8 and png.shape == (10, 10, 3)
    np.testing.assert_array_equal(rgb_to_id(png), gt * 10)
    assert ann["image_id"] == 1 and ann["file_name"] == "000001.png"
    info = {s["id"]: s for s in ann["segments_info"]}
    assert sorted(info) == [10, 20, 30, 40]
    assert info[10] == {
        "id": 10,
        "category_id": SKY,
        "isthing": False,
        "area": 40,
        "bbox": [0, 0, 10, 4],
        "iscrowd": 0,
        "score": 1.0,
    }
    assert info[20]["category_id"] == GRASS and info[20]["bbox"] == [5, 4, 5, 6]
    assert (
        info[40]["category_id"] == CAT
        and info[40]["bbox"] == [0, 8, 5, 2]
        and info[40]["area"] == 10
    )
    assert info[30]["score"] == pytest.approx(0.9)

    json_path = write_panoptic_predictions(
        [(ann, png)],
        json_path=tmp_path / "out" / "pred.json",
        png_dir=tmp_path / "out" / "pred",
        categories=CATEGORIES,
    )
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == [
        "000001.png",
        "pred",
        "pred.json",
    ]
    assert json.loads(json_path.read_text())["categories"] == CATEGORIES
    m = pq_compute(gt_json, gt_dir, json_path, tmp_path / "out" / "pred")
    check(m["All"], 1, 1, 1, N=3)


def test_panoptic_to_coco_errors():
    ids = torch.tensor([[1, 2]], dtype=torch.int32)
    kw = dict(image_id=3, file_name="a.jpg", thing_category_ids=[CAT], stuff_category_ids=[SKY])
    with pytest.raises(ValueError, match=r"\[2\] are in the id map but not in segments"):
        panoptic_to_coco(
            PanopticSegmentation(
                ids=ids, segments=[Segment(id=1, label=0, isthing=True, score=1, area=1)]
            ),
            **kw,
        )
    with pytest.raises(ValueError, match="stuff label 1, out of range for 1 stuff"):
        panoptic_to_coco(
            PanopticSegmentation(
                ids=ids,
                segments=[
                    Segment(id=1, label=0, isthing=True, score=1, area=1),
                    Segment(id=2, label=1, isthing=False, score=1, area=1),
                ],
            ),
            **kw,
        )
