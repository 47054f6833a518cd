"""Property-based fuzzing of the other formats' readers: LVIS files (as training data and as
evaluation ground truth), evaluation results, Cityscapes instance PNGs and the Cityscapes metric.
Every input either works or raises our one-line error naming the file; nothing else escapes."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from fuzzing import (
    WARNING_FILTERS,
    count,
    field_mutation,
    fuzz,
    rect_mask,
    report_examples,
    structural_mutation,
)
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dynaseg.data.cityscapes import convert_cityscapes
from dynaseg.data.coco import DatasetError, load_coco_instances
from dynaseg.data.rle_strings import rle_string_counts, rle_strings_cover
from dynaseg.evaluation.cityscapes import evaluate_cityscapes
from dynaseg.evaluation.coco import EvaluationError, evaluate_coco

pytestmark = WARNING_FILTERS


@pytest.fixture(scope="module", autouse=True)
def _report_examples(request):
    yield from report_examples(request)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


@st.composite
def lvis_documents(draw) -> tuple[dict, list[dict]]:
    """A valid LVIS v1 ground truth (1-3 images, 1-4 categories) and results for it."""
    num_cats = draw(st.integers(1, 4))
    cats = [
        {"id": c + 1, "name": f"c{c}", "frequency": draw(st.sampled_from("rcf"))}
        for c in range(num_cats)
    ]
    images, anns, results = [], [], []
    for i in range(1, draw(st.integers(1, 3)) + 1):
        h, w = draw(st.integers(4, 24)), draw(st.integers(4, 24))
        cids = list(range(1, num_cats + 1))
        images.append(
            {
                "id": i,
                "height": h,
                "width": w,
                "coco_url": f"http://x/val2017/{i}.jpg",
                "neg_category_ids": draw(st.lists(st.sampled_from(cids), max_size=2, unique=True)),
                "not_exhaustive_category_ids": draw(
                    st.lists(st.sampled_from(cids), max_size=1, unique=True)
                ),
            }
        )
        for _ in range(draw(st.integers(0, 3))):
            x0, y0 = draw(st.integers(0, w - 2)), draw(st.integers(0, h - 2))
            x1, y1 = draw(st.integers(x0 + 1, w)), draw(st.integers(y0 + 1, h))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": draw(st.sampled_from(cids)),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                }
            )
        for _ in range(draw(st.integers(0, 3))):
            mask = draw(rect_mask(h, w))
            results.append(
                {
                    "image_id": i,
                    "category_id": draw(st.sampled_from(cids)),
                    "bbox": mask_util.toBbox(
                        mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                    ).tolist(),
                    "score": draw(st.floats(0, 1)),
                    "segmentation": _rle(mask),
                }
            )
    return {"images": images, "annotations": anns, "categories": cats}, results


def _one_line(error: Exception) -> None:
    assert "\n" not in str(error) and str(error), repr(error)


@fuzz(150)
@given(data=st.data(), docs=lvis_documents(), target=st.sampled_from(["gt", "results", "both"]))
def test_fuzz_lvis_and_results_in_evaluation(data, docs, target):
    gt, results = copy.deepcopy(docs)
    mutations = st.one_of(st.just("field"), st.just("structural"))
    for which, doc in (("gt", gt), ("results", {"results": results})):
        if target in (which, "both") and doc:
            kind = data.draw(mutations)
            data.draw((field_mutation if kind == "field" else structural_mutation)(doc))
    try:
        metrics = evaluate_coco(gt, results, ("bbox", "segm"))
    except EvaluationError as e:
        _one_line(e)
        count("evaluation_refused")
    else:
        assert set(metrics) == {"bbox", "segm"}
        count("evaluation_ok")


@fuzz(120)
@given(data=st.data(), docs=lvis_documents())
def test_fuzz_lvis_as_training_data(data, docs):
    gt = copy.deepcopy(docs[0])
    if data.draw(st.booleans()):
        data.draw(field_mutation(gt))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lvis.json"
        path.write_text(json.dumps(gt))
        try:
            loaded = load_coco_instances(path, tmp, check_files=False)
        except DatasetError as e:
            _one_line(e)
            assert str(e).startswith(str(path)), str(e)
            count("lvis_load_refused")
        else:
            assert all(r.file_name.endswith(".jpg") for r in loaded.records)
            count("lvis_load_ok")


_CITYSCAPES_VALUES = st.sampled_from(
    [0, 1, 4, 7, 23, 24, 26, 29, 33, 34, 255, 1000, 24_000, 24_001, 26_005, 33_999, 34_000, 65_535]
)


@fuzz(100)
@given(
    ids=st.lists(_CITYSCAPES_VALUES, min_size=1, max_size=6),
    layout=st.lists(st.integers(0, 5), min_size=32, max_size=32),
    image_size=st.sampled_from([(8, 16), (8, 16), (8, 15)]),
    mode=st.sampled_from(["I;16", "I;16", "L", "RGB"]),
)
def test_fuzz_cityscapes_conversion(ids, layout, image_size, mode):
    """Random instanceIds PNGs (unknown labels, wrong modes, sizes that differ from the image)."""
    values = np.array(ids)[np.array(layout) % len(ids)].reshape(4, 8).repeat(2, 0).repeat(2, 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gt, img = root / "gtFine" / "val" / "ulm", root / "leftImg8bit" / "val" / "ulm"
        gt.mkdir(parents=True)
        img.mkdir(parents=True)
        array = values.astype(np.uint16 if mode == "I;16" else np.uint8)
        if mode == "RGB":
            array = np.stack([array] * 3, -1)
        Image.fromarray(array).save(gt / "ulm_000000_000001_gtFine_instanceIds.png")
        Image.new("RGB", image_size[::-1]).save(img / "ulm_000000_000001_leftImg8bit.png")
        try:
            paths = convert_cityscapes(root, root / "coco")
        except DatasetError as e:
            _one_line(e)
            count("cityscapes_refused")
            return
        results = [
            {"image_id": 1, "category_id": 26, "score": 0.5, "segmentation": _rle(values >= 24_000)}
        ]
        metrics = evaluate_cityscapes(paths["val_json"], results)
        assert set(metrics) == {"AP", "AP50", "per_class"}
        count("cityscapes_ok")


@fuzz(300)
@given(
    masks=st.lists(rect_mask(6, 9), min_size=1, max_size=4),
    text=st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=120), max_size=12),
    where=st.integers(0, 4),
    total=st.sampled_from([54, 53, 55, 0]),
)
def test_fuzz_rle_strings_cover_agrees_with_the_decoder(masks, text, where, total):
    """The vectorised check of many strings says what decoding each one says."""
    strings = [_rle(m)["counts"] for m in masks]
    totals = [54] * len(strings)
    strings.insert(min(where, len(strings)), text)
    totals.insert(min(where, len(totals)), total)
    runs = rle_string_counts(text)
    expected = runs is not None and sum(runs) == total and total > 0
    assert rle_strings_cover(strings, totals) == expected
    count("rle_strings")
