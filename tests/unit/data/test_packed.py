"""The packed record storage: records built from flat arrays equal what the file says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util

from dynaseg.bench.coco_sized import write_coco_sized
from dynaseg.data.coco import load_coco_instances
from dynaseg.data.packed import PackedRecords

POLY_A1 = [[1.0, 1.0, 9.0, 1.0, 9.0, 7.0], [12.0, 2.0, 15.0, 2.0, 15.0, 6.0, 12.0, 6.0]]
POLY_B1 = [[2.0, 2.0, 6.0, 2.0, 6.0, 6.0]]
POLY_A2 = [[3.5, 3.25, 8.0, 3.0, 5.0, 9.0]]
CROWD = {"size": [10, 20], "counts": [30, 5, 165]}  # uncompressed: 5 pixels on in column 1


def _file(tmp_path: Path) -> Path:
    anns = [  # interleaved images; each image keeps its annotations in file order
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 14, 6], "segmentation": POLY_A1},
        {"id": 2, "image_id": 5, "category_id": 9, "bbox": [2, 2, 4, 4], "segmentation": POLY_B1},
        {
            "id": 3,
            "image_id": 7,
            "category_id": 9,
            "bbox": [0, 0, 2, 10],
            "segmentation": CROWD,
            "iscrowd": 1,
        },
        {
            "id": 4,
            "image_id": 7,
            "category_id": 9,
            "bbox": [3.5, 3, 4.5, 6],
            "segmentation": POLY_A2,
        },
    ]
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 10, "width": 20},
            {"id": 5, "file_name": "b.png", "height": 8, "width": 8},
            {"id": 6, "file_name": "c.png", "height": 8, "width": 16},
        ],
        "categories": [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}],
        "annotations": anns,
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_records_are_rebuilt_exactly_from_the_arrays(tmp_path):
    data = load_coco_instances(_file(tmp_path), tmp_path, check_files=False)
    records = data.records
    assert isinstance(records, PackedRecords) and len(records) == 3
    a, b, c = records
    assert (a.image_id, a.file_name, a.height, a.width) == (7, str(tmp_path / "a.png"), 10, 20)
    assert [x.segmentation for x in a.annotations if not x.iscrowd] == [POLY_A1, POLY_A2]
    assert [x.category for x in a.annotations] == [0, 1, 1]  # contiguous: 3 -> 0, 9 -> 1
    assert a.annotations[0].bbox_xyxy == (1.0, 1.0, 15.0, 7.0)
    crowd = a.annotations[1]
    assert crowd.iscrowd and isinstance(crowd.segmentation["counts"], str)  # stored compressed
    decoded = mask_util.decode({"size": [10, 20], "counts": crowd.segmentation["counts"].encode()})
    assert decoded.sum() == 5 and decoded[:, 3].sum() == 5
    assert b.annotations[0].segmentation == POLY_B1 and c.annotations == ()
    assert records[-1] == c and records[1:] == [b, c]
    with pytest.raises(IndexError):
        records[3]
    np.testing.assert_allclose(records.aspect_ratios(), [2.0, 1.0, 2.0])
    assert records.categories_per_image() == [[0, 1], [1], []]
    assert records.categories_per_image(crowd=True) == [[0, 1, 1], [1], []]


def test_a_generated_coco_sized_file_loads_with_its_counts(tmp_path):
    path = write_coco_sized(tmp_path / "g.json", num_images=60, num_instances=500, seed=2)
    data = load_coco_instances(path, tmp_path, check_files=False)
    assert len(data.records) == 60
    assert data.stats["annotations"] + data.stats["dropped_no_valid_polygon"] == 500
    assert 0 < data.stats["crowd_annotations"] < 50
