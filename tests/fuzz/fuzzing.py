"""Shared helpers for the property-based fuzzing of the data pipeline (hypothesis); not a test module.

The fuzz tests live in ``test_fuzz_coco.py``, ``test_fuzz_panoptic.py`` and
``test_fuzz_transforms_images.py``. They generate random valid and corrupted COCO instances / COCO
panoptic files, image bytes and transform inputs. Properties: valid input loads and yields consistent
samples; invalid input is either dropped in a documented way (counted in ``stats``) or raises
``DatasetError`` / ``ImageReadError`` naming the file -- never another exception, a crash or a hang.
Derandomized (fixed examples) for CI; the number of examples each test ran is printed at the end of
each module ("fuzz examples: ...", see ``report_examples``).
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from dynaseg.data.coco import DatasetError
from dynaseg.data.collate import BatchCollator
from dynaseg.data.dataset import InstanceDataset, Sample
from dynaseg.data.image_io import ImageReadError
from dynaseg.structures.panoptic import IGNORE_LABEL

WARNING_FILTERS = [  # each fuzz module: ``pytestmark = WARNING_FILTERS``
    pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"
    ),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Pillow on corrupt EXIF / TIFF tags
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

EXAMPLES: Counter[str] = Counter()  # examples run per test


def fuzz(max_examples: int) -> Callable:
    """Fixed-seed hypothesis settings: same examples on every run, no deadline, no example database."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def count(name: str) -> None:
    EXAMPLES[name] += 1


def report_examples(request) -> Iterator[None]:
    """Body of each fuzz module's module-scoped autouse fixture: prints the examples its tests ran.

    Use as ``yield from report_examples(request)``.
    """
    before = EXAMPLES.copy()
    start = time.perf_counter()
    yield
    examples = EXAMPLES - before  # this module's examples only
    total = sum(examples.values())
    per_test = ", ".join(f"{k}={v}" for k, v in sorted(examples.items()))
    line = f"fuzz examples: {total} in {time.perf_counter() - start:.1f} s ({per_test})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if examples and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown without -s
            reporter.write_line("\n" + line)


# ----------------------------------------------------------------------------- strategies

HUGE_INTS = st.sampled_from([10**400, -(10**400), 2**63, 2**64 + 1])
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def rect_mask(draw, h: int, w: int) -> np.ndarray:
    """(h, w) bool: one random rectangle, possibly empty."""
    x0, x1 = sorted(draw(st.lists(st.integers(0, w), min_size=2, max_size=2)))
    y0, y1 = sorted(draw(st.lists(st.integers(0, h), min_size=2, max_size=2)))
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _containers(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every list / dict inside ``node``."""
    out = [path] if isinstance(node, (list, dict)) else []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        out += _containers(child, path + (key,))
    return out


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every value below ``node`` (leaves and containers)."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    out = []
    for key, child in items:
        out += [path + (key,)] + _paths(child, path + (key,))
    return out


_SPECIALS = st.sampled_from(
    [
        10**400,
        -(10**400),
        2**63,
        math.nan,
        math.inf,
        -1,
        0,
        1.5,
        True,
        "1",
        "",
        None,
        [],
        {},
        [1],
        [[1, 2]],
        {"size": [1, 1]},
    ]
).map(copy.deepcopy)  # fresh containers
SPECIAL_VALUES = st.one_of(_SPECIALS, _SPECIALS, _SPECIALS, json_values)


@st.composite
def field_mutation(draw, doc: dict) -> str:
    """Set any one value of ``doc`` (a field, a list element, a whole list) to an odd value."""
    paths = _paths(doc)
    if not paths:
        return "none"
    path = draw(st.sampled_from(paths))
    at(doc, path[:-1])[path[-1]] = draw(SPECIAL_VALUES)
    return f"field {path}"


def at(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def structural_mutation(draw, doc: dict) -> str:
    """Replace, delete or add one value anywhere in ``doc`` (in place); returns what it did."""
    path = draw(st.sampled_from(_containers(doc)))
    node = at(doc, path)
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "add" or not node:
        if isinstance(node, list):
            node.append(draw(json_values))
        else:
            node[draw(st.sampled_from(["id", "bbox", "size", "counts", "iscrowd", "x"]))] = draw(
                json_values
            )
        return f"add at {path}"
    key = draw(
        st.sampled_from(list(node.keys()) if isinstance(node, dict) else list(range(len(node))))
    )
    if action == "delete":
        del node[key]
    else:
        node[key] = draw(json_values)
    return f"{action} {path + (key,)}"


def write_png(path: Path, h: int, w: int, seed: int = 0) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, compress_level=0)


TRANSFORM_SIZES = st.tuples(
    st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    st.sampled_from([0, 16, 33, 64]),
    st.sampled_from([0, 1, 8, 32]),
)


# ----------------------------------------------------------------------------- invariants


def check_error(err: Exception, *names: str) -> None:
    """User-facing error: one of ours, a one-line message starting with one of ``names``."""
    assert isinstance(err, (DatasetError, ImageReadError)), repr(err)
    msg = str(err)
    assert any(msg.startswith(n + ":") for n in names), (msg, names)
    assert "\n" not in msg, msg


def _check_sample(s: Sample, size: tuple[int, int] | None, num_classes: int) -> None:
    h, w = s.image.shape[-2:]
    assert s.image.dtype == torch.uint8 and s.image.dim() == 3 and s.image.shape[0] == 3
    if size is not None:
        assert (h, w) == size
    t = s.target
    n = len(t)
    assert t.image_size == (h, w)
    assert (
        t.boxes.shape == (n, 4)
        and t.boxes.dtype == torch.float32
        and bool(torch.isfinite(t.boxes).all())
    )
    assert t.labels.shape == (n,) and t.labels.dtype == torch.int64
    assert bool(((t.labels >= 0) & (t.labels < num_classes)).all())
    assert t.masks.shape == (n, h, w) and t.masks.dtype == torch.bool
    assert bool(t.masks.flatten(1).any(1).all()), "kept instance with an empty mask"
    b = t.boxes
    assert bool(((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)).all())
    assert bool(((b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])).all())
    if s.sem_seg is not None:
        assert s.sem_seg.shape == (h, w) and s.sem_seg.dtype == torch.int64


def read_all(
    ds: InstanceDataset,
    names_of: Callable[[int], tuple[str, ...]],
    num_classes: int,
    size_of: Callable[[int], tuple[int, int] | None],
    must_succeed: bool,
) -> list[Sample | None]:
    out: list[Sample | None] = []
    for i in range(len(ds)):
        try:
            s = ds[i]
        except (DatasetError, ImageReadError) as e:
            assert not must_succeed, f"valid sample {i} raised {e!r}"
            check_error(e, *names_of(i))
            out.append(None)
            continue
        _check_sample(s, size_of(i), num_classes)
        out.append(s)
    return out


def check_batch(samples: list[Sample], divisibility: int) -> None:
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
        assert (
            batch.images[k, :, h:].abs().sum() == 0 and batch.images[k, :, :, w:].abs().sum() == 0
        )
        assert batch.targets[k] is s.target
    if samples[0].sem_seg is not None:
        assert batch.sem_seg.shape == (len(samples), hp, wp)
        for k, (s, (h, w)) in enumerate(zip(samples, sizes)):
            assert torch.equal(batch.sem_seg[k, :h, :w], s.sem_seg)
            padding = torch.cat([batch.sem_seg[k, h:].flatten(), batch.sem_seg[k, :, w:].flatten()])
            assert bool((padding == IGNORE_LABEL).all())
