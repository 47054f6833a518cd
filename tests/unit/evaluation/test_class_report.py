"""The per-size classification report (``dynaseg eval --class-report``) on hand-made cases."""

import json

from helpers import dynaseg

from dynaseg.evaluation.class_report import class_report, format_class_report

GT = {
    "images": [{"id": 1, "width": 200, "height": 200, "file_name": "a.png"}],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [10, 10, 10, 10],
            "area": 100,
            "iscrowd": 0,
        },  # small
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [50, 50, 80, 80],
            "area": 6400,
            "iscrowd": 0,
        },  # large
        {
            "id": 3,
            "image_id": 1,
            "category_id": 2,
            "bbox": [150, 10, 20, 20],
            "area": 400,
            "iscrowd": 0,
        },  # missed
        {
            "id": 4,
            "image_id": 1,
            "category_id": 2,
            "bbox": [0, 150, 40, 40],
            "area": 1600,
            "iscrowd": 1,
        },
    ],
}
RESULTS = [
    {
        "image_id": 1,
        "category_id": 2,
        "bbox": [10, 10, 10, 10],
        "score": 0.9,
    },  # small object: wrong class wins
    {
        "image_id": 1,
        "category_id": 1,
        "bbox": [10, 10, 10, 11],
        "score": 0.5,
    },  # ... its right class, lower
    {
        "image_id": 1,
        "category_id": 1,
        "bbox": [50, 50, 80, 80],
        "score": 0.8,
    },  # large object: right
    {
        "image_id": 1,
        "category_id": 2,
        "bbox": [52, 50, 80, 80],
        "score": 0.2,
    },  # below the duplicate threshold
]


def test_counts_right_wrong_missed_and_duplicates():
    report = class_report(GT, RESULTS, size_bounds=(16, 64))
    rows = {
        tuple(b["range"]): (b["objects"], b["right"], b["wrong"], b["missed"])
        for b in report["buckets"]
    }
    assert rows == {
        (0.0, 16.0): (1, 0, 1, 0),
        (16.0, 64.0): (1, 0, 0, 1),
        (64.0, float("inf")): (1, 1, 0, 0),
    }
    # Three detections score >= 0.3; one (class 1 at 0.5) sits under a class-2 detection at 0.9.
    assert report["duplicates"] == {"score_threshold": 0.3, "detections": 3, "other_class": 1}
    assert ">= 64" in format_class_report(report)


def test_eval_command_class_report_json(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "res.json").write_text(json.dumps(RESULTS))
    out = json.loads(
        dynaseg(
            "eval",
            "--gt",
            tmp_path / "gt.json",
            "--results",
            tmp_path / "res.json",
            "--iou-types",
            "bbox",
            "--class-report",
            "--json",
        ).stdout
    )
    assert set(out) == {"bbox", "class_report"}
    assert [b["wrong"] for b in out["class_report"]["buckets"]] == [1, 0, 0, 0]
