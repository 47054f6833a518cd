"""Property-based fuzzing of the COCO panoptic loader and dataset (hypothesis): random valid and
corrupted documents and panoptic PNGs. Helpers: ``fuzzing.py``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fuzzing import (
    TRANSFORM_SIZES,
    WARNING_FILTERS,
    at,
    check_batch,
    field_mutation,
    fuzz,
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
from PIL import Image

from dynaseg.data.coco import DatasetError
from dynaseg.data.coco_panoptic import load_coco_panoptic
from dynaseg.data.panoptic_dataset import PanopticDataset
from dynaseg.data.transforms import build_train_transforms
from dynaseg.structures.panoptic import IGNORE_LABEL, id_to_rgb

pytestmark = WARNING_FILTERS


@pytest.fixture(scope="module", autouse=True)
def _report_examples(request):
    yield from report_examples(request)


@st.composite
def panoptic_documents(draw) -> tuple[dict, dict[int, np.ndarray]]:
    """A valid COCO panoptic document and the id map of each annotated image (by image id)."""
    cats = draw(
        st.lists(
            st.tuples(st.integers(1, 300), st.booleans()),
            min_size=1,
            max_size=4,
            unique_by=lambda c: c[0],
        )
    )
    categories = [{"id": c, "name": f"c{c}", "isthing": int(t)} for c, t in cats]
    image_ids = draw(st.lists(st.integers(1, 10**6), min_size=1, max_size=3, unique=True))
    images, anns, maps = [], [], {}
    for image_id in image_ids:
        h, w = draw(st.integers(1, 14)), draw(st.integers(1, 14))
        images.append({"id": image_id, "file_name": f"img{image_id}.png", "height": h, "width": w})
        if not draw(st.integers(0, 4)):
            continue  # no panoptic annotation: all void
        ids = np.zeros((h, w), np.int64)
        for sid in draw(st.lists(st.integers(1, 256**3 - 1), max_size=4, unique=True)):
            ids[draw(rect_mask(h, w))] = sid
        segments = []
        for sid in sorted(set(np.unique(ids).tolist()) - {0}):
            seg = {
                "id": sid,
                "category_id": draw(st.sampled_from(cats))[0],
                "iscrowd": draw(st.sampled_from([0, 0, 1])),
            }
            if draw(st.booleans()):
                seg["bbox"] = [draw(st.integers(0, w)), draw(st.integers(0, h)), 1, 1]
            segments.append(seg)
        anns.append(
            {"image_id": image_id, "file_name": f"pan{image_id}.png", "segments_info": segments}
        )
        maps[image_id] = ids
    return {"images": images, "annotations": anns, "categories": categories}, maps


PANOPTIC_MUTATIONS = [
    "structural",
    "field",
    "field",
    "unlisted",
    "absent",
    "png_size",
    "png_garbage",
    "png_missing",
    "dup_segment",
    "second_annotation",
    "ghost_category",
    "isthing",
]


@st.composite
def panoptic_mutation(
    draw, doc: dict, pngs: dict[str, np.ndarray | bytes | None], kind: str
) -> str:
    if kind == "structural":
        return draw(structural_mutation(doc))
    if kind == "field":
        return draw(field_mutation(doc))
    anns = doc["annotations"]
    if not anns:
        return "none"
    ann = draw(st.sampled_from(anns))
    segs = ann["segments_info"]
    if kind == "unlisted" and segs:
        segs.pop(draw(st.integers(0, len(segs) - 1)))
    elif kind == "absent":
        segs.append({"id": 256**3 - 1 - len(segs), "category_id": doc["categories"][0]["id"]})
    elif kind == "png_size":
        ids = pngs[ann["file_name"]]
        if isinstance(ids, np.ndarray):
            crop = ids.shape[1] > 1 and draw(st.booleans())
            pngs[ann["file_name"]] = ids[:, 1:] if crop else np.concatenate([ids, ids[:1]])
    elif kind == "png_garbage":
        pngs[ann["file_name"]] = draw(st.binary(max_size=40))
    elif kind == "png_missing":
        pngs[ann["file_name"]] = None
    elif kind == "dup_segment" and segs:
        segs.append(dict(segs[0]))
    elif kind == "second_annotation":
        anns.append(json.loads(json.dumps(ann)))
    elif kind == "ghost_category" and segs:
        segs[0]["category_id"] = max(c["id"] for c in doc["categories"]) + 1
    elif kind == "isthing":
        doc["categories"][0]["isthing"] = draw(st.sampled_from([2, -1, "yes", None, 0.5]))
    return kind


def _run_panoptic(
    doc: dict,
    images: list[dict],
    pngs: dict[str, np.ndarray | bytes | None],
    *,
    valid: bool,
    sizes: tuple[tuple[int, ...], int, int],
    maps: dict[int, np.ndarray] | None = None,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pan").mkdir()
        for k, im in enumerate(images):
            write_png(root / im["file_name"], im["height"], im["width"], seed=k)
        for name, content in pngs.items():
            if isinstance(content, np.ndarray):
                Image.fromarray(id_to_rgb(content)).save(root / "pan" / name, compress_level=0)
            elif isinstance(content, bytes):
                (root / "pan" / name).write_bytes(content)
        json_path = root / "panoptic.json"
        json_path.write_text(json.dumps(doc))
        try:
            data = load_coco_panoptic(json_path, root, root / "pan")
        except DatasetError as e:
            assert not valid, f"valid document rejected: {e}"
            _check_error(e, str(json_path))
            return
        assert data.num_classes + data.num_stuff_classes == len(doc["categories"])
        for rec in data.records:
            assert len({s.id for s in rec.segments}) == len(rec.segments)
            for s in rec.segments:
                assert 0 < s.id < 256**3
                assert 0 <= s.category < (data.num_classes if s.isthing else data.num_stuff_classes)
        names = lambda i: (data.records[i].file_name, data.records[i].panoptic_file or "")  # noqa: E731
        ds = PanopticDataset(data, None, train=False)
        samples = read_all(
            ds,
            names,
            max(data.num_classes, 1),
            lambda i: (data.records[i].height, data.records[i].width),
            must_succeed=valid,
        )
        augmented = PanopticDataset(
            data,
            build_train_transforms(sizes[0], sizes[1], 0.5),
            train=True,
            max_instances=1,
            seed=2,
        )
        kept = [
            s
            for s in read_all(
                augmented, names, max(data.num_classes, 1), lambda i: None, must_succeed=valid
            )
            if s is not None
        ]
        for s in kept:
            assert len(s.target) <= 1
            assert set(s.sem_seg.unique().tolist()) <= set(range(data.num_stuff_classes)) | {
                IGNORE_LABEL
            }
        if kept:
            check_batch(kept, sizes[2])
        if maps is None:
            return
        for rec, s in zip(data.records, samples):  # valid: targets match the id map exactly
            ids = torch.from_numpy(
                maps.get(rec.image_id, np.zeros((rec.height, rec.width), np.int64))
            )
            things = [g for g in rec.segments if g.isthing and not g.iscrowd]
            assert len(s.target) == len(things)
            for g, m, label in zip(things, s.target.masks, s.target.labels.tolist()):
                assert torch.equal(m, ids == g.id) and label == g.category
            expected = torch.full(ids.shape, IGNORE_LABEL, dtype=torch.int64)
            for g in rec.segments:
                if not g.isthing and not g.iscrowd:
                    expected[ids == g.id] = g.category
            assert torch.equal(s.sem_seg, expected)


@fuzz(150)
@given(doc_maps=panoptic_documents(), sizes=TRANSFORM_SIZES)
def test_fuzz_panoptic_valid(doc_maps, sizes):
    doc, maps = doc_maps
    pngs = {a["file_name"]: maps[a["image_id"]] for a in doc["annotations"]}
    _run_panoptic(doc, doc["images"], pngs, valid=True, sizes=sizes, maps=maps)
    _count("panoptic_valid")


@fuzz(300)
@given(data=st.data(), doc_maps=panoptic_documents(), sizes=TRANSFORM_SIZES)
def test_fuzz_panoptic_invalid(data, doc_maps, sizes):
    doc, maps = doc_maps
    images = json.loads(json.dumps(doc["images"]))
    pngs: dict[str, np.ndarray | bytes | None] = {
        a["file_name"]: maps[a["image_id"]] for a in doc["annotations"]
    }
    kinds = data.draw(st.lists(st.sampled_from(PANOPTIC_MUTATIONS), min_size=1, max_size=2))
    for kind in sorted(kinds, key=lambda k: k in ("structural", "field")):
        data.draw(panoptic_mutation(doc, pngs, kind))
    _run_panoptic(doc, images, pngs, valid=False, sizes=sizes)
    _count("panoptic_invalid")


# ----------------------------------------------------------------------------- regressions


@pytest.mark.parametrize(
    "where, value, message",
    [
        (
            ("images", 0, "id"),
            10**400,
            r"images\[0\]: 'id' must be a 64-bit integer, got 1000000",
        ),  # OverflowError
        (
            ("images", 0, "height"),
            2**40,
            r"image id=1: size 1099511627776x20 exceeds 536870911 pixels",
        ),
        (
            ("annotations", 0, "segments_info", 0, "id"),
            10**400,
            r"segments_info\[0\]: 'id' must be a 64-bit",
        ),
        (
            ("annotations", 0, "segments_info", 0, "bbox"),
            [0, 0, 10**400, 1],
            r"'bbox' must be 4 finite numbers",
        ),
    ],
)
def test_fuzzing_regressions_panoptic(tmp_path: Path, where: tuple, value: Any, message: str):
    (tmp_path / "pan").mkdir()
    write_png(tmp_path / "a.png", 20, 20)
    Image.fromarray(id_to_rgb(np.ones((20, 20), np.int64))).save(tmp_path / "pan" / "a.png")
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}],
        "annotations": [
            {"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 1, "category_id": 3}]}
        ],
        "categories": [{"id": 3, "name": "sky", "isthing": 0}],
    }
    at(doc, where[:-1])[where[-1]] = value
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=message) as err:
        load_coco_panoptic(path, tmp_path, tmp_path / "pan")
    _check_error(err.value, str(path))
