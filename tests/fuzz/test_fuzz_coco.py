"""Property-based fuzzing of the COCO instances loader (hypothesis): random valid and corrupted
documents, arbitrary JSON, and the compressed-RLE string decoder. Helpers: ``fuzzing.py``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fuzzing import (
    HUGE_INTS,
    TRANSFORM_SIZES,
    WARNING_FILTERS,
    check_batch,
    field_mutation,
    fuzz,
    json_values,
    read_all,
    rect_mask,
    report_examples,
    structural_mutation,
    write_png,
)

# The test bodies call ``_count`` / ``_check_error``: hypothesis derives a derandomized test's
# examples from a hash of its source, so keeping the bodies as they were keeps the examples.
from fuzzing import check_error as _check_error
from fuzzing import count as _count
from hypothesis import given
from hypothesis import strategies as st
from pycocotools import mask as mask_util

from dynaseg.data.coco import STAT_REASONS, DatasetError, load_coco_instances
from dynaseg.data.coco_panoptic import load_coco_panoptic
from dynaseg.data.dataset import InstanceDataset
from dynaseg.data.rle_strings import rle_string_counts
from dynaseg.data.transforms import build_train_transforms, resized_shape

pytestmark = WARNING_FILTERS


@pytest.fixture(scope="module", autouse=True)
def _report_examples(request):
    yield from report_examples(request)


# ----------------------------------------------------------------------------- strategies

SPECIAL_FLOATS = st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e308, -1e308, 1e-320, 1e12, -1e12]
)


def coords(extent: int) -> st.SearchStrategy:
    """A coordinate near an image side of ``extent`` px, sometimes absurd."""
    return st.one_of(
        st.floats(-extent, 2.0 * extent, allow_nan=False, allow_infinity=False),
        st.integers(-extent, 2 * extent),
        SPECIAL_FLOATS,
        HUGE_INTS,
    )


def _uncompressed(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE run lengths: column-major, alternating, starting with background."""
    flat, value, counts, begin = mask.flatten(order="F"), False, [], 0
    for k in range(len(flat) + 1):
        if k == len(flat) or bool(flat[k]) != value:
            counts.append(k - begin)
            begin, value = k, not value
    return counts


@st.composite
def good_polygon(draw, h: int, w: int) -> list[float]:
    points = draw(st.lists(st.tuples(st.floats(0, w), st.floats(0, h)), min_size=3, max_size=6))
    return [v for p in points for v in p]


@st.composite
def segmentations(draw, h: int, w: int) -> Any:
    kind = draw(
        st.sampled_from(["polygon", "polygon", "random_polygon", "rle", "uncompressed", "none"])
    )
    if kind == "polygon":
        return draw(st.lists(good_polygon(h, w), min_size=1, max_size=2))
    if kind == "random_polygon":
        return draw(st.lists(st.lists(coords(max(h, w)), max_size=12), max_size=3))
    if kind == "none":
        return None
    mask = draw(rect_mask(h, w))
    if kind == "rle":
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    return {"size": [h, w], "counts": _uncompressed(mask)}


@st.composite
def good_box(draw, h: int, w: int) -> list[float]:
    x, y = draw(st.floats(0, w - 0.5)), draw(st.floats(0, h - 0.5))
    return [x, y, draw(st.floats(0.5, w - x)), draw(st.floats(0.5, h - y))]


@st.composite
def coco_documents(draw) -> dict[str, Any]:
    """A *valid* COCO instances document: it may contain degenerate annotations (documented drops),
    never inconsistencies."""
    cat_ids = draw(st.lists(st.integers(-5, 1000), min_size=1, max_size=3, unique=True))
    image_ids = draw(st.lists(st.integers(0, 10**12), min_size=1, max_size=3, unique=True))
    images = [
        {
            "id": i,
            "file_name": f"{k}.png",
            "height": draw(st.integers(1, 20)),
            "width": draw(st.integers(1, 20)),
        }
        for k, i in enumerate(image_ids)
    ]
    anns = []
    for k in range(draw(st.integers(0, 6))):
        im = draw(st.sampled_from(images))
        h, w = im["height"], im["width"]
        ann = {
            "id": k + 1,
            "image_id": im["id"],
            "category_id": draw(st.sampled_from(cat_ids)),
            "bbox": draw(
                st.one_of(
                    good_box(h, w), st.tuples(coords(w), coords(h), coords(w), coords(h)).map(list)
                )
            ),
            "iscrowd": draw(st.sampled_from([0, 0, 0, 1, False])),
        }
        seg = draw(segmentations(h, w))
        if seg is not None or draw(st.booleans()):
            ann["segmentation"] = seg
        anns.append(ann)
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": f"class{c}"} for c in cat_ids],
    }


@st.composite
def coco_mutation(draw, doc: dict, kind: str) -> str:
    """One targeted inconsistency (on the intact structure), or a structural mutation."""
    if kind == "structural":
        return draw(structural_mutation(doc))
    if kind == "field":
        return draw(field_mutation(doc))
    images, anns, cats = doc["images"], doc["annotations"], doc["categories"]
    rles = [a for a in anns if isinstance(a.get("segmentation"), dict)]
    if kind == "dup_image" and len(images) > 1:
        images[1]["id"] = images[0]["id"]
    elif kind == "dup_category":
        cats.append(dict(cats[0]))
    elif kind == "ghost_image" and anns:
        draw(st.sampled_from(anns))["image_id"] = max(i["id"] for i in images) + 1
    elif kind == "ghost_category" and anns:
        draw(st.sampled_from(anns))["category_id"] = max(c["id"] for c in cats) + 1
    elif kind == "image_size":
        draw(st.sampled_from(images))[draw(st.sampled_from(["height", "width"]))] = draw(
            st.sampled_from([0, -3, 2.5, "12", 10**9, 7, 1, None])
        )
    elif kind == "rle_size" and rles:
        rle = draw(st.sampled_from(rles))["segmentation"]
        rle["size"] = [rle["size"][0] + 1, rle["size"][1]]
    elif kind == "rle_counts" and rles:
        rle = draw(st.sampled_from(rles))["segmentation"]
        if isinstance(rle["counts"], str):
            rle["counts"] = draw(
                st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=130), max_size=10)
            )
        else:
            rle["counts"] = rle["counts"] + [draw(st.integers(-2, 3))]
    elif kind == "dup_ann_id" and len(anns) > 1:
        anns[1]["id"] = anns[0]["id"]
    return kind


# ----------------------------------------------------------------------------- invariants

ANNOTATION_DROPS = (
    "dropped_degenerate_bbox",
    "dropped_nonfinite_bbox",
    "dropped_no_valid_polygon",
    "dropped_empty_rle",
    "dropped_missing_segmentation",
)


def _check_instances(data, doc: dict) -> None:
    assert data.num_classes == len(data.category_ids) == len(data.class_names) >= 1
    assert data.category_ids == sorted(data.category_ids)
    assert set(STAT_REASONS) <= set(data.stats)
    kept = 0
    for rec in data.records:
        assert os.path.isabs(rec.file_name) and rec.height > 0 and rec.width > 0
        for a in rec.annotations:
            kept += 1
            assert 0 <= a.category < data.num_classes
            x0, y0, x1, y1 = a.bbox_xyxy
            assert all(map(math.isfinite, a.bbox_xyxy))
            assert 0 <= x0 < x1 <= rec.width and 0 <= y0 < y1 <= rec.height
            if isinstance(a.segmentation, dict):
                assert a.segmentation["size"] == [rec.height, rec.width]
            else:
                assert a.segmentation and all(
                    len(p) >= 6 and len(p) % 2 == 0 for p in a.segmentation
                )
                assert all(math.isfinite(v) for p in a.segmentation for v in p)
    assert kept == data.stats["annotations"]
    # Every annotation is kept or counted under exactly one drop reason.
    assert kept + sum(data.stats[k] for k in ANNOTATION_DROPS) == len(doc["annotations"])


# ----------------------------------------------------------------------------- COCO instances


def _run_coco(
    doc: dict,
    raw_images: list[dict],
    *,
    valid: bool,
    short: tuple[int, ...],
    max_size: int,
    divisibility: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k, im in enumerate(raw_images):
            write_png(root / f"{k}.png", im["height"], im["width"], seed=k)
        json_path = root / "ann.json"
        json_path.write_text(json.dumps(doc))
        try:
            data = load_coco_instances(json_path, root)
        except DatasetError as e:
            assert not valid, f"valid document rejected: {e}"
            _check_error(e, str(json_path))
            return
        _check_instances(data, doc)
        names = lambda i: (data.records[i].file_name, str(json_path))  # noqa: E731
        plain = InstanceDataset(data, None, train=True)
        samples = read_all(
            plain,
            names,
            data.num_classes,
            lambda i: (data.records[i].height, data.records[i].width),
            must_succeed=valid,
        )
        for i, s in enumerate(
            samples
        ):  # deterministic (undersized RLEs used to decode uninitialised memory)
            if s is not None:
                assert torch.equal(plain[i].target.masks, s.target.masks)
        for rec, s in zip(data.records, samples):
            if s is not None:  # untransformed: kept boxes are the clipped annotation boxes
                boxes = {a.bbox_xyxy for a in rec.annotations if not a.iscrowd}
                assert {tuple(b) for b in s.target.boxes.tolist()} <= {
                    tuple(torch.tensor(b, dtype=torch.float32).tolist()) for b in boxes
                }
        augmented = InstanceDataset(
            data, build_train_transforms(short, max_size, 0.5), train=True, max_instances=2, seed=1
        )
        sizes = lambda i: None  # noqa: E731  (one of several random sizes)
        kept = [
            s
            for s in read_all(augmented, names, data.num_classes, sizes, must_succeed=valid)
            if s is not None
        ]
        for s in kept:
            assert len(s.target) <= 2
            b = s.target.boxes
            assert bool(((b[:, 2] - b[:, 0] >= 1 - 1e-4) & (b[:, 3] - b[:, 1] >= 1 - 1e-4)).all())
            assert tuple(s.image.shape[-2:]) in {
                resized_shape(*s.original_size, m, max_size) for m in short
            }
        if kept:
            check_batch(kept, divisibility)


COCO_MUTATIONS = [
    "structural",
    "field",
    "field",
    "dup_image",
    "dup_category",
    "ghost_image",
    "ghost_category",
    "image_size",
    "rle_size",
    "rle_counts",
    "dup_ann_id",
]


@fuzz(200)
@given(doc=coco_documents(), sizes=TRANSFORM_SIZES)
def test_fuzz_coco_valid(doc, sizes):
    _run_coco(
        doc, doc["images"], valid=True, short=sizes[0], max_size=sizes[1], divisibility=sizes[2]
    )
    _count("coco_valid")


@fuzz(350)
@given(data=st.data(), doc=coco_documents(), sizes=TRANSFORM_SIZES)
def test_fuzz_coco_invalid(data, doc, sizes):
    raw_images = json.loads(json.dumps(doc["images"]))
    kinds = data.draw(st.lists(st.sampled_from(COCO_MUTATIONS), min_size=1, max_size=3))
    for kind in sorted(
        kinds, key=lambda k: k in ("structural", "field")
    ):  # these last: they break the shape
        data.draw(coco_mutation(doc, kind))
    _run_coco(
        doc, raw_images, valid=False, short=sizes[0], max_size=sizes[1], divisibility=sizes[2]
    )
    _count("coco_invalid")


@fuzz(200)
@given(
    doc=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"images": json_values, "annotations": json_values, "categories": json_values}
        ),
    )
)
def test_fuzz_random_json_structures(doc):
    """Arbitrary JSON in both loaders: only DatasetError naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        path.write_text(json.dumps(doc))
        for load in (
            lambda: load_coco_instances(path, tmp),
            lambda: load_coco_panoptic(path, tmp, tmp),
        ):
            try:
                load()
            except DatasetError as e:
                _check_error(e, str(path))
    _count("random_json")


def test_deeply_nested_and_binary_json(tmp_path: Path):
    path = tmp_path / "ann.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match=r"ann\.json: JSON nested too deeply"):
        load_coco_instances(path, tmp_path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match=r"ann\.json: not valid JSON"):
        load_coco_panoptic(path, tmp_path, tmp_path)


@fuzz(400)
@given(
    mask=st.integers(1, 12).flatmap(
        lambda h: st.integers(1, 12).flatmap(lambda w: rect_mask(h, w))
    ),
    noise=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)), max_size=6),
    text=st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=111), max_size=10),
)
def test_fuzz_rle_string_decoder_matches_pycocotools(mask, noise, text):
    """``rle_string_counts`` reads pycocotools' strings exactly, and strings it accepts decode in
    pycocotools to exactly the runs it reports."""
    for y, x in noise:
        if y < mask.shape[0] and x < mask.shape[1]:
            mask[y, x] = not mask[y, x]
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
    assert rle_string_counts(encoded) == _uncompressed(mask)
    runs = rle_string_counts(text)
    if runs is not None and 0 < sum(runs) <= 4096:
        decoded = mask_util.decode({"size": [1, sum(runs)], "counts": text.encode("ascii")})
        expected = np.concatenate([np.full(r, k % 2, np.uint8) for k, r in enumerate(runs)])
        assert np.array_equal(decoded[0], expected)
    _count("rle_decoder")


# ----------------------------------------------------------------------------- regressions

_BASE_ANN = {
    "id": 1,
    "image_id": 1,
    "category_id": 7,
    "bbox": [1, 1, 5, 5],
    "segmentation": [[1, 1, 6, 1, 6, 6]],
}


@pytest.mark.parametrize(
    "change, outcome",
    [
        ({"bbox": [10**400, 1, 5, 5]}, "dropped_nonfinite_bbox"),  # was OverflowError
        (
            {"segmentation": [[10**400, 1, 6, 1, 6, 6]]},
            "dropped_no_valid_polygon",
        ),  # was OverflowError
        (
            {"segmentation": [[1, 1, 1e9, 1, 1e9, 1e9]]},
            "dropped_no_valid_polygon",
        ),  # pycocotools segfaulted
        (
            {"segmentation": [[1, 1, 1e7, 1, 1e7, 1e7]]},
            "dropped_no_valid_polygon",
        ),  # pycocotools took 1 s
        (
            {"segmentation": [[30, 30, 36, 30, 36, 36]]},
            "dropped_no_valid_polygon",
        ),  # outside: empty mask
        (
            {"id": [1]},
            r"annotations\[0\]: 'id' must be a number or a string, got \[1\]",
        ),  # was TypeError
        (
            {"segmentation": {"size": [20, 20], "counts": "zzzz"}},  # decoded uninitialised memory
            r"annotation id=1: compressed RLE counts 'zzzz' do not decode to run lengths summing to h\*w = 400",
        ),
        (
            {"segmentation": {"size": [20, 20], "counts": "0"}},
            r"'0' do not decode to run lengths summing",
        ),
        (
            {"segmentation": {"size": [20, 20], "counts": "1o"}},
            r"'1o' do not decode",
        ),  # dangling continuation
    ],
)
def test_fuzzing_regressions_coco(tmp_path: Path, change: dict, outcome: str):
    write_png(tmp_path / "a.png", 20, 20)
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}],
        "annotations": [{**_BASE_ANN, **change}],
        "categories": [{"id": 7, "name": "cat"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    if outcome.startswith("dropped_"):
        data = load_coco_instances(path, tmp_path)
        assert data.stats[outcome] == 1 and data.stats["annotations"] == 0
    else:
        with pytest.raises(DatasetError, match=outcome) as err:
            load_coco_instances(path, tmp_path)
        _check_error(err.value, str(path))
