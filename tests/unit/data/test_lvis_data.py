"""LVIS files as training data: images found through ``coco_url``, repeat-factor sampling."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dynaseg.data.coco import DatasetError, load_coco_instances
from dynaseg.data.samplers import TrainingSampler, repeat_factors


def _lvis_file(tmp_path: Path, *, with_file_names: bool = False) -> Path:
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    images = []
    for i in (1, 2):
        Image.new("RGB", (40, 30)).save(tmp_path / "coco" / "val2017" / f"{i:012d}.jpg")
        image = {
            "id": i,
            "height": 30,
            "width": 40,
            "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg",
            "neg_category_ids": [2],
            "not_exhaustive_category_ids": [],
        }
        if with_file_names:
            image["file_name"] = f"val2017/{i:012d}.jpg"
        images.append(image)
    data = {
        "images": images,
        "categories": [
            {"id": 1, "name": "aerosol_can", "frequency": "c"},
            {"id": 2, "name": "air_conditioner", "frequency": "f"},
        ],
        "annotations": [  # LVIS annotations have no iscrowd
            {
                "id": 7,
                "image_id": 1,
                "category_id": 1,
                "bbox": [2, 3, 10, 8],
                "area": 80.0,
                "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
            },
        ],
    }
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(data))
    return path


def test_lvis_images_are_found_through_coco_url(tmp_path):
    path = _lvis_file(tmp_path)
    data = load_coco_instances(path, tmp_path / "coco")
    assert [r.file_name for r in data.records] == [
        str(tmp_path / "coco" / "val2017" / f"{i:012d}.jpg") for i in (1, 2)
    ]
    assert data.class_names == ["aerosol_can", "air_conditioner"]
    assert [len(r.annotations) for r in data.records] == [1, 0]
    assert not data.records[0].annotations[0].iscrowd
    # read as plain COCO, the same file lacks file names
    with pytest.raises(DatasetError, match=r"images\[0\]: missing field\(s\) \['file_name'\]"):
        load_coco_instances(path, tmp_path / "coco", dataset_format="coco")


def test_lvis_image_without_a_usable_url_is_a_one_line_error(tmp_path):
    path = _lvis_file(tmp_path)
    data = json.loads(path.read_text())
    data["images"][1]["coco_url"] = "nourl"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image id=2: needs a 'file_name' or a 'coco_url'"):
        load_coco_instances(path, tmp_path / "coco")


def test_repeat_factors_follow_the_lvis_rule():
    # 10 images: category 0 in all of them, 1 in one (f = 0.1), 2 in four (f = 0.4); t = 0.4
    cats = [[0, 1]] + [[0, 2]] * 4 + [[0]] * 5
    factors = repeat_factors(cats + [[]], threshold=0.4)  # + an image without objects
    f0 = max(1.0, math.sqrt(0.4 / (10 / 11)))  # category 0: in 10 of the 11 images
    f1 = math.sqrt(0.4 / (1 / 11))
    f2 = max(1.0, math.sqrt(0.4 / (4 / 11)))
    assert factors == pytest.approx([f1] + [f2] * 4 + [f0] * 5 + [1.0])
    assert f1 > f2 > 1.0 == f0


def test_repeat_factor_sampler_repeats_in_expectation():
    factors = [1.0, 2.0, 1.5, 3.25]
    sampler = TrainingSampler(4, seed=3, repeat=factors)
    counts = Counter()
    epochs = 400
    for e in range(epochs):
        per_epoch = Counter(sampler.epoch_indices(e))
        assert per_epoch[0] == 1 and per_epoch[1] == 2 and per_epoch[3] in (3, 4)
        counts.update(per_epoch)
    assert counts[2] / epochs == pytest.approx(1.5, abs=0.08)
    assert counts[3] / epochs == pytest.approx(3.25, abs=0.08)


def test_repeat_factor_sampler_resumes_and_shards():
    factors = [1.0, 2.6, 1.3, 1.0, 4.1]
    full = iter(TrainingSampler(5, seed=1, repeat=factors))
    stream = [next(full) for _ in range(60)]  # several epochs of different lengths
    for skip in (0, 7, 23, 41):
        resumed = iter(TrainingSampler(5, seed=1, repeat=factors, skip=skip))
        assert [next(resumed) for _ in range(60 - skip)] == stream[skip:]
    whole = TrainingSampler(5, seed=1, repeat=factors).epoch_indices(2)
    a, b = (TrainingSampler(5, seed=1, rank=r, world_size=2, repeat=factors) for r in (0, 1))
    a, b = a.epoch_indices(2), b.epoch_indices(2)
    padded = whole + whole[: len(whole) % 2]  # wrapped to a multiple of the world size
    assert len(a) == len(b) and sorted(a + b) == sorted(padded)
    assert [x for pair in zip(a, b) for x in pair] == padded
