"""Tests for panoptic overlays (draw_panoptic), the Predictor's panoptic mode and `dynaseg predict` on
a panoptic model (a fake one: the checks are about drawing and files, not about segmenting)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dynaseg.config.schema import DataConfig, DR1MaskConfig, ExperimentConfig
from dynaseg.inference.visualize import _interior_point, draw_panoptic, save_panoptic_overlay
from dynaseg.structures.instances import Instances
from dynaseg.structures.panoptic import PanopticSegmentation, Segment, rgb_to_id

H, W = 96, 128
THINGS = ["person", "car"]
STUFF = ["sky", "road"]
BASE = (90, 120, 150)

# Layout: sky rows 0:40; road rows 40:96 × cols 0:64; void rows 40:96 × cols 64:128;
# person rows 16:40 × cols 8:40 (on the sky), car rows 56:88 × cols 16:48 (on the road).
PERSON = (slice(16, 40), slice(8, 40))
CAR = (slice(56, 88), slice(16, 48))


def _image() -> np.ndarray:
    return np.broadcast_to(np.asarray(BASE, np.uint8), (H, W, 3)).copy()


def _pan(
    sky: int = 1, road: int = 2, person: int = 3, car: int = 4, *, with_instances: bool = True
) -> PanopticSegmentation:
    """Two stuff segments, two things and void, with the given segment ids."""
    ids = torch.zeros(H, W, dtype=torch.int32)
    ids[:40] = sky
    ids[40:, :64] = road
    ids[PERSON] = person
    ids[CAR] = car
    area = {i: int((ids == i).sum()) for i in (sky, road, person, car)}
    segments = sorted(
        [
            Segment(id=sky, label=0, isthing=False, score=1.0, area=area[sky]),
            Segment(id=road, label=1, isthing=False, score=1.0, area=area[road]),
            Segment(id=person, label=0, isthing=True, score=0.9, area=area[person]),
            Segment(id=car, label=1, isthing=True, score=0.75, area=area[car]),
        ],
        key=lambda s: s.id,
    )
    instances = None
    if with_instances:
        instances = Instances(
            image_size=(H, W),
            boxes=torch.tensor([[8.0, 16, 40, 40], [16.0, 56, 48, 88]]),
            labels=torch.tensor([0, 1]),
            scores=torch.tensor([0.9, 0.75]),
            masks=torch.stack([ids == person, ids == car]),
        )
    return PanopticSegmentation(ids=ids, segments=segments, instances=instances)


# --------------------------------------------------------------------------- draw_panoptic
def test_draw_panoptic_tints_segments_and_leaves_void():
    img, pan = _image(), _pan()
    out = draw_panoptic(img, pan, thing_names=THINGS, stuff_names=STUFF)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert np.array_equal(img, _image()), "input modified"
    changed = (out != img).any(-1)
    assert changed[pan.ids.numpy() > 0].all(), (
        "every stuff and thing pixel is tinted (or under a tag)"
    )
    # Void far from any tag (tags sit at the thing corners and inside the stuff regions).
    assert not changed[60:, 96:].any()


def test_draw_panoptic_darkens_thing_boundaries():
    out = draw_panoptic(_image(), _pan(), thing_names=THINGS, stuff_names=STUFF).astype(int).sum(-1)
    for rows, cols in (PERSON, CAR):
        interior = out[(rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2]
        mid_r, mid_c = (rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2
        # Left, right and bottom edges (the top edge carries the tag).
        for edge in (out[mid_r, cols.start], out[mid_r, cols.stop - 1], out[rows.stop - 1, mid_c]):
            assert edge < interior
        assert out[mid_r + 3, cols.start + 3] == interior  # no boundary inside


def test_draw_panoptic_stuff_colour_depends_only_on_class():
    a = draw_panoptic(_image(), _pan(), thing_names=THINGS, stuff_names=STUFF)
    b = draw_panoptic(
        _image(), _pan(sky=7, road=5, person=2, car=1), thing_names=THINGS, stuff_names=STUFF
    )
    assert np.array_equal(a[2, 120], b[2, 120])  # sky corner, away from tags
    assert np.array_equal(a[93, 2], b[93, 2])  # road corner
    assert not np.array_equal(a[2, 120], a[93, 2])


def test_draw_panoptic_inputs():
    pan = _pan()
    chw = torch.from_numpy(_image()).permute(2, 0, 1).contiguous()
    from_tensor = draw_panoptic(chw, pan, thing_names=THINGS, stuff_names=STUFF, alpha=0.3)
    assert np.array_equal(
        from_tensor, draw_panoptic(_image(), pan, thing_names=THINGS, stuff_names=STUFF, alpha=0.3)
    )
    # Unknown labels print as numbers; no segments: image unchanged.
    draw_panoptic(_image(), pan, thing_names=[], stuff_names=[])
    empty = PanopticSegmentation(ids=torch.zeros(H, W, dtype=torch.int32), segments=[])
    assert np.array_equal(
        draw_panoptic(_image(), empty, thing_names=THINGS, stuff_names=STUFF), _image()
    )
    with pytest.raises(ValueError, match="resize"):
        draw_panoptic(_image()[:50], pan, thing_names=THINGS, stuff_names=STUFF)


def test_save_panoptic_overlay(tmp_path):
    path = save_panoptic_overlay(
        tmp_path / "sub" / "x.png", _image(), _pan(), thing_names=THINGS, stuff_names=STUFF
    )
    saved = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(
        saved, draw_panoptic(_image(), _pan(), thing_names=THINGS, stuff_names=STUFF)
    )


@pytest.mark.parametrize("shape", ["ring", "c", "split", "line", "pixel", "large"])
def test_interior_point_is_inside(shape):
    m = np.zeros((300, 400), bool)
    if shape == "ring":
        m[20:280, 20:380] = True
        m[60:240, 60:340] = False
    elif shape == "c":
        m[20:280, 20:380] = True
        m[60:240, 60:] = False
    elif shape == "split":
        m[10:20, 10:20] = m[200:290, 100:390] = True
    elif shape == "line":
        m[150, 3:397] = True
    elif shape == "pixel":
        m[7, 9] = True
    else:
        m[:] = True
    x, y = _interior_point(m)
    assert m[int(y), int(x)]
    if shape == "large":  # deep inside: near the centre
        assert abs(x - 200) < 12 and abs(y - 150) < 12
    assert _interior_point(np.zeros((5, 5), bool)) is None


# --------------------------------------------------------------------------- Predictor + CLI
class _FakePanopticModel(nn.Module):
    """Returns ``_pan`` (variant per call) at each image's original size, whatever the pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, batch):
        out = []
        for size in batch.original_sizes:
            assert tuple(size) == (H, W)
            # Second image: ids that need all three PNG channels, and no thing detections.
            pan = (
                _pan()
                if self.calls % 2 == 0
                else _pan(sky=5, road=300, person=70_000, car=65_536, with_instances=False)
            )
            self.calls += 1
            out.append(pan)
        return out


META = {
    "class_names": THINGS,
    "category_ids": [1, 3],
    "stuff_names": STUFF,
    "stuff_category_ids": [92, 95],
}


@pytest.fixture
def panoptic_cfg(monkeypatch) -> ExperimentConfig:
    """A panoptic config whose model is the fake one and whose weights carry ``META``."""
    import dynaseg.inference.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "build_model", lambda cfg, **kw: _FakePanopticModel())
    monkeypatch.setattr(predictor_module, "load_weights", lambda model, path: None)
    monkeypatch.setattr(predictor_module, "read_metadata", lambda path: dict(META))
    return ExperimentConfig(
        model=DR1MaskConfig(num_classes=2, num_stuff_classes=2),
        device="cpu",
        data=DataConfig(min_size_test=64, max_size_test=100),
    )


def test_predictor_panoptic(panoptic_cfg, monkeypatch):
    import dynaseg.inference.predictor as predictor_module
    from dynaseg.config.presets import load_config

    predictor = predictor_module.Predictor(panoptic_cfg, "w.safetensors")
    assert predictor.is_panoptic
    assert (predictor.class_names, predictor.category_ids) == (THINGS, [1, 3])
    assert (predictor.stuff_names, predictor.stuff_category_ids) == (STUFF, [92, 95])
    pan = predictor(_image())
    assert isinstance(pan, PanopticSegmentation)
    assert pan.ids.device.type == "cpu" and pan.instances.masks.device.type == "cpu"
    assert torch.equal(pan.ids, _pan().ids)

    monkeypatch.setattr(predictor_module, "read_metadata", lambda path: {})
    instance_cfg = dataclasses.replace(load_config("blendmask_tiny"), device="cpu")
    plain = predictor_module.Predictor(instance_cfg, "w.safetensors")
    assert not plain.is_panoptic
    assert (plain.stuff_names, plain.stuff_category_ids) == ([], [])


def test_predict_cli_writes_panoptic_files(panoptic_cfg, monkeypatch, tmp_path):
    import dynaseg.config.presets
    from dynaseg.cli import main

    monkeypatch.setattr(
        dynaseg.config.presets, "load_config", lambda name, overrides=(): panoptic_cfg
    )
    src, out = tmp_path / "images", tmp_path / "out"
    src.mkdir()
    for name in ("a.png", "b.bmp"):  # lossless, so overlays compare exactly
        Image.fromarray(_image()).save(src / name)
    rc = main(
        [
            "predict",
            "--config",
            "fake",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--input",
            str(src),
            "--output",
            str(out),
            "--score-threshold",
            "0.8",
        ]
    )
    assert rc == 0

    expected = {"a": _pan(), "b": _pan(sky=5, road=300, person=70_000, car=65_536)}
    doc = json.loads((out / "panoptic.json").read_text())
    assert doc["categories"] == [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 3, "name": "car", "isthing": 1},
        {"id": 92, "name": "sky", "isthing": 0},
        {"id": 95, "name": "road", "isthing": 0},
    ]
    assert [(a["image_id"], a["file_name"]) for a in doc["annotations"]] == [
        (1, "a.png"),
        (2, "b.png"),
    ]
    category = {(True, 0): 1, (True, 1): 3, (False, 0): 92, (False, 1): 95}
    for ann, (stem, pan) in zip(doc["annotations"], expected.items()):
        ids = rgb_to_id(np.asarray(Image.open(out / "panoptic" / f"{stem}.png").convert("RGB")))
        assert np.array_equal(ids, pan.ids.numpy())
        got = {s["id"]: (s["category_id"], s["area"], s["iscrowd"]) for s in ann["segments_info"]}
        assert got == {s.id: (category[(s.isthing, s.label)], s.area, 0) for s in pan.segments}
        overlay = np.asarray(Image.open(out / f"{stem}.png").convert("RGB"))
        assert np.array_equal(
            overlay, draw_panoptic(_image(), pan, thing_names=THINGS, stuff_names=STUFF)
        )

    # Thing detections above the threshold (only the person of the first image; the second has none).
    results = json.loads((out / "results.json").read_text())
    assert [(r["image_id"], r["category_id"], r["file_name"]) for r in results] == [(1, 1, "a.png")]
    assert results[0]["bbox"] == [8.0, 16.0, 32.0, 24.0] and "segmentation" in results[0]


def test_predict_cli_panoptic_rejects_color_by_resolution(
    panoptic_cfg, monkeypatch, tmp_path, capsys
):
    import dynaseg.config.presets
    from dynaseg.cli import main

    monkeypatch.setattr(
        dynaseg.config.presets, "load_config", lambda name, overrides=(): panoptic_cfg
    )
    Image.fromarray(_image()).save(tmp_path / "a.png")
    rc = main(
        [
            "predict",
            "--config",
            "fake",
            "--weights",
            "w.safetensors",
            "--input",
            str(tmp_path / "a.png"),
            "--output",
            str(tmp_path / "out"),
            "--color-by",
            "resolution",
        ]
    )
    assert rc == 2 and "panoptic" in capsys.readouterr().err


def test_predict_cli_numbers_stuff_without_metadata(panoptic_cfg, monkeypatch, tmp_path):
    """Weights without stuff metadata: stuff categories numbered on from the largest thing id."""
    import dynaseg.config.presets
    import dynaseg.inference.predictor as predictor_module
    from dynaseg.cli import main

    monkeypatch.setattr(
        dynaseg.config.presets, "load_config", lambda name, overrides=(): panoptic_cfg
    )
    monkeypatch.setattr(
        predictor_module,
        "read_metadata",
        lambda path: {"class_names": THINGS, "category_ids": [1, 3]},
    )
    Image.fromarray(_image()).save(tmp_path / "a.png")
    assert (
        main(
            [
                "predict",
                "--config",
                "fake",
                "--weights",
                "w.safetensors",
                "--input",
                str(tmp_path / "a.png"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    assert [(c["id"], c["name"], c["isthing"]) for c in doc["categories"]] == [
        (1, "person", 1),
        (3, "car", 1),
        (4, "stuff_0", 0),
        (5, "stuff_1", 0),
    ]
    assert {s["category_id"] for s in doc["annotations"][0]["segments_info"]} == {1, 3, 4, 5}
