"""Property-based fuzzing of the data pipeline with hypothesis.

Random valid and corrupted COCO instances / COCO panoptic files, image bytes and transform inputs.
Properties: valid input loads and yields consistent samples; invalid input is either dropped in a
documented way (counted in ``stats``) or raises ``DatasetError`` / ``ImageReadError`` naming the
file -- never another exception, a crash or a hang. Derandomized (fixed examples) for CI; the
number of examples each test ran is printed at the end of the module ("fuzz examples: ...").
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_util
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from dynaseg.data.coco import STAT_REASONS, DatasetError, load_coco_instances, rle_string_counts
from dynaseg.data.coco_panoptic import load_coco_panoptic
from dynaseg.data.collate import BatchCollator
from dynaseg.data.dataset import InstanceDataset, Sample
from dynaseg.data.image_io import ImageReadError, read_image
from dynaseg.data.panoptic_dataset import PanopticDataset
from dynaseg.data.transforms import build_test_transforms, build_train_transforms, resized_shape
from dynaseg.structures.panoptic import IGNORE_LABEL, id_to_rgb

pytestmark = [
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Pillow on corrupt EXIF / TIFF tags
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

EXAMPLES: Counter[str] = Counter()  # examples run per test


def fuzz(max_examples: int) -> Callable:
    """Fixed-seed hypothesis settings: same examples on every run, no deadline, no example database."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _count(name: str) -> None:
    EXAMPLES[name] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_examples(request):
    start = time.perf_counter()
    yield
    total = sum(EXAMPLES.values())
    per_test = ", ".join(f"{k}={v}" for k, v in sorted(EXAMPLES.items()))
    line = f"fuzz examples: {total} in {time.perf_counter() - start:.1f} s ({per_test})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if EXAMPLES and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown without -s
            reporter.write_line("\n" + line)


# ----------------------------------------------------------------------------- strategies

HUGE_INTS = st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63, 2 ** 64 + 1])
SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 1e-320, 1e12, -1e12])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), HUGE_INTS,
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)


def coords(extent: int) -> st.SearchStrategy:
    """A coordinate near an image side of ``extent`` px, sometimes absurd."""
    return st.one_of(st.floats(-extent, 2.0 * extent, allow_nan=False, allow_infinity=False),
                     st.integers(-extent, 2 * extent), SPECIAL_FLOATS, HUGE_INTS)


@st.composite
def rect_mask(draw, h: int, w: int) -> np.ndarray:
    """(h, w) bool: one random rectangle, possibly empty."""
    x0, x1 = sorted(draw(st.lists(st.integers(0, w), min_size=2, max_size=2)))
    y0, y1 = sorted(draw(st.lists(st.integers(0, h), min_size=2, max_size=2)))
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


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
    kind = draw(st.sampled_from(["polygon", "polygon", "random_polygon", "rle", "uncompressed", "none"]))
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
    image_ids = draw(st.lists(st.integers(0, 10 ** 12), min_size=1, max_size=3, unique=True))
    images = [{"id": i, "file_name": f"{k}.png", "height": draw(st.integers(1, 20)),
               "width": draw(st.integers(1, 20))} for k, i in enumerate(image_ids)]
    anns = []
    for k in range(draw(st.integers(0, 6))):
        im = draw(st.sampled_from(images))
        h, w = im["height"], im["width"]
        ann = {"id": k + 1, "image_id": im["id"], "category_id": draw(st.sampled_from(cat_ids)),
               "bbox": draw(st.one_of(good_box(h, w), st.tuples(coords(w), coords(h), coords(w), coords(h)).map(list))),
               "iscrowd": draw(st.sampled_from([0, 0, 0, 1, False]))}
        seg = draw(segmentations(h, w))
        if seg is not None or draw(st.booleans()):
            ann["segmentation"] = seg
        anns.append(ann)
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}"} for c in cat_ids]}


def _containers(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every list / dict inside ``node``."""
    out = [path] if isinstance(node, (list, dict)) else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out += _containers(child, path + (key,))
    return out


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every value below ``node`` (leaves and containers)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for key, child in items:
        out += [path + (key,)] + _paths(child, path + (key,))
    return out


_SPECIALS = st.sampled_from([10 ** 400, -(10 ** 400), 2 ** 63, math.nan, math.inf, -1, 0, 1.5, True, "1", "",
                             None, [], {}, [1], [[1, 2]], {"size": [1, 1]}]).map(copy.deepcopy)  # fresh containers
SPECIAL_VALUES = st.one_of(_SPECIALS, _SPECIALS, _SPECIALS, json_values)


@st.composite
def field_mutation(draw, doc: dict) -> str:
    """Set any one value of ``doc`` (a field, a list element, a whole list) to an odd value."""
    paths = _paths(doc)
    if not paths:
        return "none"
    path = draw(st.sampled_from(paths))
    _at(doc, path[:-1])[path[-1]] = draw(SPECIAL_VALUES)
    return f"field {path}"


def _at(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def structural_mutation(draw, doc: dict) -> str:
    """Replace, delete or add one value anywhere in ``doc`` (in place); returns what it did."""
    path = draw(st.sampled_from(_containers(doc)))
    node = _at(doc, path)
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "add" or not node:
        if isinstance(node, list):
            node.append(draw(json_values))
        else:
            node[draw(st.sampled_from(["id", "bbox", "size", "counts", "iscrowd", "x"]))] = draw(json_values)
        return f"add at {path}"
    key = draw(st.sampled_from(list(node.keys()) if isinstance(node, dict) else list(range(len(node)))))
    if action == "delete":
        del node[key]
    else:
        node[key] = draw(json_values)
    return f"{action} {path + (key,)}"


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
            st.sampled_from([0, -3, 2.5, "12", 10 ** 9, 7, 1, None]))
    elif kind == "rle_size" and rles:
        rle = draw(st.sampled_from(rles))["segmentation"]
        rle["size"] = [rle["size"][0] + 1, rle["size"][1]]
    elif kind == "rle_counts" and rles:
        rle = draw(st.sampled_from(rles))["segmentation"]
        if isinstance(rle["counts"], str):
            rle["counts"] = draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=130), max_size=10))
        else:
            rle["counts"] = rle["counts"] + [draw(st.integers(-2, 3))]
    elif kind == "dup_ann_id" and len(anns) > 1:
        anns[1]["id"] = anns[0]["id"]
    return kind


def _write_png(path: Path, h: int, w: int, seed: int = 0) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, compress_level=0)


# ----------------------------------------------------------------------------- invariants

def _check_error(err: Exception, *names: str) -> None:
    """User-facing error: one of ours, a one-line message starting with one of ``names``."""
    assert isinstance(err, (DatasetError, ImageReadError)), repr(err)
    msg = str(err)
    assert any(msg.startswith(n + ":") for n in names), (msg, names)
    assert "\n" not in msg, msg


ANNOTATION_DROPS = ("dropped_degenerate_bbox", "dropped_nonfinite_bbox", "dropped_no_valid_polygon",
                    "dropped_empty_rle", "dropped_missing_segmentation")


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
                assert a.segmentation and all(len(p) >= 6 and len(p) % 2 == 0 for p in a.segmentation)
                assert all(math.isfinite(v) for p in a.segmentation for v in p)
    assert kept == data.stats["annotations"]
    # Every annotation is kept or counted under exactly one drop reason.
    assert kept + sum(data.stats[k] for k in ANNOTATION_DROPS) == len(doc["annotations"])


def _check_sample(s: Sample, size: tuple[int, int] | None, num_classes: int) -> None:
    h, w = s.image.shape[-2:]
    assert s.image.dtype == torch.uint8 and s.image.dim() == 3 and s.image.shape[0] == 3
    if size is not None:
        assert (h, w) == size
    t = s.target
    n = len(t)
    assert t.image_size == (h, w)
    assert t.boxes.shape == (n, 4) and t.boxes.dtype == torch.float32 and bool(torch.isfinite(t.boxes).all())
    assert t.labels.shape == (n,) and t.labels.dtype == torch.int64
    assert bool(((t.labels >= 0) & (t.labels < num_classes)).all())
    assert t.masks.shape == (n, h, w) and t.masks.dtype == torch.bool
    assert bool(t.masks.flatten(1).any(1).all()), "kept instance with an empty mask"
    b = t.boxes
    assert bool(((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)).all())
    assert bool(((b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])).all())
    if s.sem_seg is not None:
        assert s.sem_seg.shape == (h, w) and s.sem_seg.dtype == torch.int64


def _read_all(ds: InstanceDataset, names_of: Callable[[int], tuple[str, ...]], num_classes: int,
              size_of: Callable[[int], tuple[int, int] | None], must_succeed: bool) -> list[Sample | None]:
    out: list[Sample | None] = []
    for i in range(len(ds)):
        try:
            s = ds[i]
        except (DatasetError, ImageReadError) as e:
            assert not must_succeed, f"valid sample {i} raised {e!r}"
            _check_error(e, *names_of(i))
            out.append(None)
            continue
        _check_sample(s, size_of(i), num_classes)
        out.append(s)
    return out


# ----------------------------------------------------------------------------- COCO instances

def _run_coco(doc: dict, raw_images: list[dict], *, valid: bool, short: tuple[int, ...], max_size: int,
              divisibility: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for k, im in enumerate(raw_images):
            _write_png(root / f"{k}.png", im["height"], im["width"], seed=k)
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
        samples = _read_all(plain, names, data.num_classes, lambda i: (data.records[i].height, data.records[i].width),
                            must_succeed=valid)
        for i, s in enumerate(samples):  # deterministic (undersized RLEs used to decode uninitialised memory)
            if s is not None:
                assert torch.equal(plain[i].target.masks, s.target.masks)
        for rec, s in zip(data.records, samples):
            if s is not None:  # untransformed: kept boxes are the clipped annotation boxes
                boxes = {a.bbox_xyxy for a in rec.annotations if not a.iscrowd}
                assert {tuple(b) for b in s.target.boxes.tolist()} <= {
                    tuple(torch.tensor(b, dtype=torch.float32).tolist()) for b in boxes}
        augmented = InstanceDataset(data, build_train_transforms(short, max_size, 0.5), train=True,
                                    max_instances=2, seed=1)
        sizes = lambda i: None  # noqa: E731  (one of several random sizes)
        kept = [s for s in _read_all(augmented, names, data.num_classes, sizes, must_succeed=valid) if s is not None]
        for s in kept:
            assert len(s.target) <= 2
            b = s.target.boxes
            assert bool(((b[:, 2] - b[:, 0] >= 1 - 1e-4) & (b[:, 3] - b[:, 1] >= 1 - 1e-4)).all())
            assert tuple(s.image.shape[-2:]) in {resized_shape(*s.original_size, m, max_size) for m in short}
        if kept:
            _check_batch(kept, divisibility)


def _check_batch(samples: list[Sample], divisibility: int) -> None:
    """BatchCollator: zero padding to a common multiple of ``divisibility``, per-image targets kept."""
    batch = BatchCollator(divisibility)(samples)
    sizes = [tuple(s.image.shape[-2:]) for s in samples]
    hp, wp = batch.images.shape[-2:]
    assert batch.images.shape[:2] == (len(samples), 3) and batch.images.dtype == torch.float32
    assert hp >= max(h for h, _ in sizes) and wp >= max(w for _, w in sizes)
    if divisibility > 1:
        assert hp % divisibility == 0 and wp % divisibility == 0
    for k, (s, (h, w)) in enumerate(zip(samples, sizes)):
        assert torch.equal(batch.images[k, :, :h, :w], s.image.float())
        assert batch.images[k, :, h:].abs().sum() == 0 and batch.images[k, :, :, w:].abs().sum() == 0
        assert batch.targets[k] is s.target
    if samples[0].sem_seg is not None:
        assert batch.sem_seg.shape == (len(samples), hp, wp)
        for k, (s, (h, w)) in enumerate(zip(samples, sizes)):
            assert torch.equal(batch.sem_seg[k, :h, :w], s.sem_seg)
            padding = torch.cat([batch.sem_seg[k, h:].flatten(), batch.sem_seg[k, :, w:].flatten()])
            assert bool((padding == IGNORE_LABEL).all())


COCO_MUTATIONS = ["structural", "field", "field", "dup_image", "dup_category", "ghost_image", "ghost_category",
                  "image_size", "rle_size", "rle_counts", "dup_ann_id"]
TRANSFORM_SIZES = st.tuples(st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
                            st.sampled_from([0, 16, 33, 64]), st.sampled_from([0, 1, 8, 32]))


@fuzz(300)
@given(doc=coco_documents(), sizes=TRANSFORM_SIZES)
def test_fuzz_coco_valid(doc, sizes):
    _run_coco(doc, doc["images"], valid=True, short=sizes[0], max_size=sizes[1], divisibility=sizes[2])
    _count("coco_valid")


@fuzz(500)
@given(data=st.data(), doc=coco_documents(), sizes=TRANSFORM_SIZES)
def test_fuzz_coco_invalid(data, doc, sizes):
    raw_images = json.loads(json.dumps(doc["images"]))
    kinds = data.draw(st.lists(st.sampled_from(COCO_MUTATIONS), min_size=1, max_size=3))
    for kind in sorted(kinds, key=lambda k: k in ("structural", "field")):  # these last: they break the shape
        data.draw(coco_mutation(doc, kind))
    _run_coco(doc, raw_images, valid=False, short=sizes[0], max_size=sizes[1], divisibility=sizes[2])
    _count("coco_invalid")


@fuzz(200)
@given(doc=st.one_of(json_values, st.fixed_dictionaries(
    {"images": json_values, "annotations": json_values, "categories": json_values})))
def test_fuzz_random_json_structures(doc):
    """Arbitrary JSON in both loaders: only DatasetError naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ann.json"
        path.write_text(json.dumps(doc))
        for load in (lambda: load_coco_instances(path, tmp), lambda: load_coco_panoptic(path, tmp, tmp)):
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
@given(mask=st.integers(1, 12).flatmap(lambda h: st.integers(1, 12).flatmap(lambda w: rect_mask(h, w))),
       noise=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)), max_size=6),
       text=st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=111), max_size=10))
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


# ----------------------------------------------------------------------------- COCO panoptic

@st.composite
def panoptic_documents(draw) -> tuple[dict, dict[int, np.ndarray]]:
    """A valid COCO panoptic document and the id map of each annotated image (by image id)."""
    cats = draw(st.lists(st.tuples(st.integers(1, 300), st.booleans()), min_size=1, max_size=4,
                         unique_by=lambda c: c[0]))
    categories = [{"id": c, "name": f"c{c}", "isthing": int(t)} for c, t in cats]
    image_ids = draw(st.lists(st.integers(1, 10 ** 6), min_size=1, max_size=3, unique=True))
    images, anns, maps = [], [], {}
    for image_id in image_ids:
        h, w = draw(st.integers(1, 14)), draw(st.integers(1, 14))
        images.append({"id": image_id, "file_name": f"img{image_id}.png", "height": h, "width": w})
        if not draw(st.integers(0, 4)):
            continue  # no panoptic annotation: all void
        ids = np.zeros((h, w), np.int64)
        for sid in draw(st.lists(st.integers(1, 256 ** 3 - 1), max_size=4, unique=True)):
            ids[draw(rect_mask(h, w))] = sid
        segments = []
        for sid in sorted(set(np.unique(ids).tolist()) - {0}):
            seg = {"id": sid, "category_id": draw(st.sampled_from(cats))[0],
                   "iscrowd": draw(st.sampled_from([0, 0, 1]))}
            if draw(st.booleans()):
                seg["bbox"] = [draw(st.integers(0, w)), draw(st.integers(0, h)), 1, 1]
            segments.append(seg)
        anns.append({"image_id": image_id, "file_name": f"pan{image_id}.png", "segments_info": segments})
        maps[image_id] = ids
    return {"images": images, "annotations": anns, "categories": categories}, maps


PANOPTIC_MUTATIONS = ["structural", "field", "field", "unlisted", "absent", "png_size", "png_garbage", "png_missing",
                      "dup_segment", "second_annotation", "ghost_category", "isthing"]


@st.composite
def panoptic_mutation(draw, doc: dict, pngs: dict[str, np.ndarray | bytes | None], kind: str) -> str:
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
        segs.append({"id": 256 ** 3 - 1 - len(segs), "category_id": doc["categories"][0]["id"]})
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


def _run_panoptic(doc: dict, images: list[dict], pngs: dict[str, np.ndarray | bytes | None], *, valid: bool,
                  sizes: tuple[tuple[int, ...], int, int], maps: dict[int, np.ndarray] | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pan").mkdir()
        for k, im in enumerate(images):
            _write_png(root / im["file_name"], im["height"], im["width"], seed=k)
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
                assert 0 < s.id < 256 ** 3
                assert 0 <= s.category < (data.num_classes if s.isthing else data.num_stuff_classes)
        names = lambda i: (data.records[i].file_name, data.records[i].panoptic_file or "")  # noqa: E731
        ds = PanopticDataset(data, None, train=False)
        samples = _read_all(ds, names, max(data.num_classes, 1),
                            lambda i: (data.records[i].height, data.records[i].width), must_succeed=valid)
        augmented = PanopticDataset(data, build_train_transforms(sizes[0], sizes[1], 0.5), train=True,
                                    max_instances=1, seed=2)
        kept = [s for s in _read_all(augmented, names, max(data.num_classes, 1), lambda i: None, must_succeed=valid)
                if s is not None]
        for s in kept:
            assert len(s.target) <= 1
            assert set(s.sem_seg.unique().tolist()) <= set(range(data.num_stuff_classes)) | {IGNORE_LABEL}
        if kept:
            _check_batch(kept, sizes[2])
        if maps is None:
            return
        for rec, s in zip(data.records, samples):  # valid: targets match the id map exactly
            ids = torch.from_numpy(maps.get(rec.image_id, np.zeros((rec.height, rec.width), np.int64)))
            things = [g for g in rec.segments if g.isthing and not g.iscrowd]
            assert len(s.target) == len(things)
            for g, m, label in zip(things, s.target.masks, s.target.labels.tolist()):
                assert torch.equal(m, ids == g.id) and label == g.category
            expected = torch.full(ids.shape, IGNORE_LABEL, dtype=torch.int64)
            for g in rec.segments:
                if not g.isthing and not g.iscrowd:
                    expected[ids == g.id] = g.category
            assert torch.equal(s.sem_seg, expected)


@fuzz(200)
@given(doc_maps=panoptic_documents(), sizes=TRANSFORM_SIZES)
def test_fuzz_panoptic_valid(doc_maps, sizes):
    doc, maps = doc_maps
    pngs = {a["file_name"]: maps[a["image_id"]] for a in doc["annotations"]}
    _run_panoptic(doc, doc["images"], pngs, valid=True, sizes=sizes, maps=maps)
    _count("panoptic_valid")


@fuzz(400)
@given(data=st.data(), doc_maps=panoptic_documents(), sizes=TRANSFORM_SIZES)
def test_fuzz_panoptic_invalid(data, doc_maps, sizes):
    doc, maps = doc_maps
    images = json.loads(json.dumps(doc["images"]))
    pngs: dict[str, np.ndarray | bytes | None] = {a["file_name"]: maps[a["image_id"]] for a in doc["annotations"]}
    kinds = data.draw(st.lists(st.sampled_from(PANOPTIC_MUTATIONS), min_size=1, max_size=2))
    for kind in sorted(kinds, key=lambda k: k in ("structural", "field")):
        data.draw(panoptic_mutation(doc, pngs, kind))
    _run_panoptic(doc, images, pngs, valid=False, sizes=sizes)
    _count("panoptic_invalid")


# ----------------------------------------------------------------------------- transforms

@st.composite
def transform_samples(draw) -> dict[str, Any]:
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    masks = [m for m in draw(st.lists(rect_mask(h, w), max_size=4)) if m.any()]
    mask = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    image = torch.from_numpy(np.random.default_rng(h * 41 + w).integers(0, 256, (3, h, w), dtype=np.uint8))
    return {"image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(mask),
            "labels": torch.arange(len(masks), dtype=torch.int64),
            "iscrowd": torch.tensor([draw(st.booleans()) for _ in masks], dtype=torch.bool),
            "sem_seg": tv_tensors.Mask(torch.from_numpy(
                np.random.default_rng(h + w).integers(0, 3, (h, w)).astype(np.uint8)) * 100)}


def _clone(sample: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() for k, v in sample.items()}


def _tight(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@fuzz(300)
@given(sample=transform_samples(), short=st.lists(st.integers(1, 60), min_size=1, max_size=3).map(tuple),
       max_size=st.sampled_from([0, 1, 7, 40, 100]), seed=st.integers(0, 2 ** 31))
def test_fuzz_train_transforms(sample, short, max_size, seed):
    h0, w0 = sample["image"].shape[-2:]
    outs = []
    for flip in (0.0, 1.0):
        torch.manual_seed(seed)
        outs.append(build_train_transforms(short, max_size, flip)(_clone(sample)))
    plain, flipped = outs
    h, w = plain["image"].shape[-2:]
    assert (h, w) in {resized_shape(h0, w0, s, max_size) for s in short}
    if max_size > 0:
        assert max(h, w) <= max(max_size, 1)
    for out in outs:
        n = out["boxes"].shape[0]
        assert out["image"].shape == (3, h, w) and out["image"].dtype == torch.uint8
        assert out["masks"].shape == (n, h, w) and out["masks"].dtype == torch.bool
        assert tuple(out["boxes"].canvas_size) == (h, w) and out["sem_seg"].shape == (h, w)
        assert set(out["sem_seg"].unique().tolist()) <= set(sample["sem_seg"].unique().tolist())
        labels = out["labels"].tolist()
        assert labels == sorted(set(labels)) and out["iscrowd"].tolist() == [
            bool(sample["iscrowd"][k]) for k in labels]  # per-instance fields stay aligned
        b = out["boxes"]
        assert bool(((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)).all())
        assert bool(((b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)).all())
        for m, box in zip(out["masks"], b):  # rectangles: the mask fills its box up to a pixel
            assert m.any()
            assert max(abs(x - y) for x, y in zip(_tight(m), box.tolist())) <= 1 + 1e-3
    # flipping is a mirror of the unflipped result
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert torch.equal(flipped["sem_seg"], plain["sem_seg"].flip(-1))
    assert torch.equal(flipped["labels"], plain["labels"])
    mirrored = torch.stack([w - plain["boxes"][:, 2], plain["boxes"][:, 1], w - plain["boxes"][:, 0],
                            plain["boxes"][:, 3]], dim=1)
    assert torch.allclose(flipped["boxes"].as_subclass(torch.Tensor), mirrored, atol=1e-4)
    _count("train_transforms")


@fuzz(200)
@given(sample=transform_samples(), short=st.integers(1, 60), max_size=st.sampled_from([0, 1, 9, 50]))
def test_fuzz_test_transforms_and_flip_involution(sample, short, max_size):
    h0, w0 = sample["image"].shape[-2:]
    out = build_test_transforms(short, max_size)(_clone(sample))
    h, w = resized_shape(h0, w0, short, max_size)
    n = sample["boxes"].shape[0]
    assert out["image"].shape == (3, h, w) and out["masks"].shape == (n, h, w)
    assert out["sem_seg"].shape == (h, w) and torch.equal(out["labels"], sample["labels"])
    b = out["boxes"]
    assert bool(((b >= -1e-4).all() and (b[:, 0::2] <= w + 1e-3).all() and (b[:, 1::2] <= h + 1e-3).all()))
    twice = {k: F.horizontal_flip(F.horizontal_flip(v)) if k in ("image", "boxes", "masks", "sem_seg") else v
             for k, v in sample.items()}
    for k in ("image", "masks", "sem_seg"):
        assert torch.equal(twice[k], sample[k])
    assert torch.allclose(twice["boxes"], sample["boxes"])
    _count("test_transforms")


# ----------------------------------------------------------------------------- image decoding

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


@st.composite
def encoded_images(draw) -> tuple[bytes, tuple[int, int], str]:
    h, w = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"] if fmt == "PNG" else ["RGB", "L"]))
    rgb = np.random.default_rng(h * 17 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    pil = Image.fromarray(rgb)
    pil = pil.convert(mode) if mode != "I;16" else Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    pil.save(buf, fmt)
    return buf.getvalue(), (h, w), fmt


@st.composite
def corruptions(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["none", "truncate", "flip", "splice", "garbage"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(max_size=64)) + data[at + draw(st.integers(0, 64)):]
    if kind == "garbage":
        return data[: draw(st.integers(0, 16))] + draw(st.binary(max_size=64))
    return data


@fuzz(500)
@given(data=st.data(), encoded=encoded_images())
def test_fuzz_read_image(data, encoded):
    """Corrupt bytes of every supported format: an RGB uint8 tensor or ImageReadError naming the
    file; never another exception or a crash (torchvision's PNG decoder used to segfault here)."""
    raw, (h, w), fmt = encoded
    content = data.draw(corruptions(raw))
    expected = data.draw(st.sampled_from([None, (h, w), (h + 1, w), (w, h)]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x{FORMATS[fmt]}"
        path.write_bytes(content)
        try:
            image = read_image(path, expected)
        except ImageReadError as e:
            _check_error(e, str(path))
            assert e.path == str(path) and e.reason
            assert content != raw or expected not in (None, (h, w)), f"intact {fmt} rejected: {e}"
        else:
            assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3
            if content == raw:
                assert tuple(image.shape[-2:]) == (h, w)
            if expected is not None:
                assert tuple(image.shape[-2:]) == expected
    _count("read_image")


# ----------------------------------------------------------------------------- regressions

_BASE_ANN = {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]}


@pytest.mark.parametrize("change, outcome", [
    ({"bbox": [10 ** 400, 1, 5, 5]}, "dropped_nonfinite_bbox"),  # was OverflowError
    ({"segmentation": [[10 ** 400, 1, 6, 1, 6, 6]]}, "dropped_no_valid_polygon"),  # was OverflowError
    ({"segmentation": [[1, 1, 1e9, 1, 1e9, 1e9]]}, "dropped_no_valid_polygon"),  # pycocotools segfaulted
    ({"segmentation": [[1, 1, 1e7, 1, 1e7, 1e7]]}, "dropped_no_valid_polygon"),  # pycocotools took 1 s
    ({"segmentation": [[30, 30, 36, 30, 36, 36]]}, "dropped_no_valid_polygon"),  # outside: empty mask
    ({"id": [1]}, r"annotations\[0\]: 'id' must be a number or a string, got \[1\]"),  # was TypeError
    ({"segmentation": {"size": [20, 20], "counts": "zzzz"}},  # decoded uninitialised memory
     r"annotation id=1: compressed RLE counts 'zzzz' do not decode to run lengths summing to h\*w = 400"),
    ({"segmentation": {"size": [20, 20], "counts": "0"}}, r"'0' do not decode to run lengths summing"),
    ({"segmentation": {"size": [20, 20], "counts": "1o"}}, r"'1o' do not decode"),  # dangling continuation
])
def test_fuzzing_regressions_coco(tmp_path: Path, change: dict, outcome: str):
    _write_png(tmp_path / "a.png", 20, 20)
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}],
           "annotations": [{**_BASE_ANN, **change}], "categories": [{"id": 7, "name": "cat"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    if outcome.startswith("dropped_"):
        data = load_coco_instances(path, tmp_path)
        assert data.stats[outcome] == 1 and data.stats["annotations"] == 0
    else:
        with pytest.raises(DatasetError, match=outcome) as err:
            load_coco_instances(path, tmp_path)
        _check_error(err.value, str(path))


@pytest.mark.parametrize("where, value, message", [
    (("images", 0, "id"), 10 ** 400, r"images\[0\]: 'id' must be a 64-bit integer, got 1000000"),  # OverflowError
    (("images", 0, "height"), 2 ** 40, r"image id=1: size 1099511627776x20 exceeds 536870911 pixels"),
    (("annotations", 0, "segments_info", 0, "id"), 10 ** 400, r"segments_info\[0\]: 'id' must be a 64-bit"),
    (("annotations", 0, "segments_info", 0, "bbox"), [0, 0, 10 ** 400, 1], r"'bbox' must be 4 finite numbers"),
])
def test_fuzzing_regressions_panoptic(tmp_path: Path, where: tuple, value: Any, message: str):
    (tmp_path / "pan").mkdir()
    _write_png(tmp_path / "a.png", 20, 20)
    Image.fromarray(id_to_rgb(np.ones((20, 20), np.int64))).save(tmp_path / "pan" / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}],
           "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 1, "category_id": 3}]}],
           "categories": [{"id": 3, "name": "sky", "isthing": 0}]}
    _at(doc, where[:-1])[where[-1]] = value
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=message) as err:
        load_coco_panoptic(path, tmp_path, tmp_path / "pan")
    _check_error(err.value, str(path))


def test_fuzzing_regression_resize_to_one_pixel():
    """torch's uint8 antialiased resize failed an internal assert for a 1x1 output."""
    image = torch.arange(3 * 3 * 3, dtype=torch.uint8).reshape(3, 3, 3) * 9
    sample = {"image": tv_tensors.Image(image),
              "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(3, 3)),
              "masks": tv_tensors.Mask(torch.zeros(0, 3, 3, dtype=torch.bool)), "labels": torch.zeros(0)}
    out = build_test_transforms(1, 0)(sample)["image"]
    assert isinstance(out, tv_tensors.Image) and out.shape == (3, 1, 1) and out.dtype == torch.uint8
    assert out.flatten().tolist() == [int(v + 0.5) for v in image.float().mean((1, 2)).tolist()]  # the mean colour
