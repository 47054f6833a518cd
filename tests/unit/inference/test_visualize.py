"""Tests for dynaseg.inference.visualize (overlays) and dynaseg.engine.loss_curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynaseg.engine.loss_curve import plot_loss_curves
from dynaseg.inference.visualize import draw_instances, instance_colors, save_overlay
from dynaseg.structures.instances import Instances

H, W = 96, 128
NAMES = ["person", "car"]


def _image() -> np.ndarray:
    return np.full((H, W, 3), 100, np.uint8)


def _instances(with_masks: bool = True) -> Instances:
    """Two square masks: box (30, 40)-(70, 80) and box (95, 60)-(125, 90) at the right edge."""
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 40:80, 30:70] = True
    masks[1, 60:90, 95:125] = True
    return Instances(
        image_size=(H, W),
        boxes=torch.tensor([[30.0, 40.0, 70.0, 80.0], [95.0, 60.0, 125.0, 90.0]]),
        labels=torch.tensor([0, 1]),
        scores=torch.tensor([0.87, 0.4]),
        masks=masks if with_masks else None,
    )


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(int) - b.astype(int)).any(-1)


def test_instance_colors_distinct() -> None:
    cols = instance_colors(20)
    assert len(set(cols)) == 20
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in cols)
    assert instance_colors(5, seed=1) != instance_colors(5, seed=0)


def test_overlay_changes_mask_pixels_only_near_boxes() -> None:
    img = _image()
    out = draw_instances(img, _instances(), NAMES)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (img == 100).all()  # input untouched
    diff = _changed(out, img)
    assert diff[45:75, 35:65].all()  # mask interior is tinted
    assert diff[65:85, 100:120].all()
    # nothing far from the boxes (and their label tags above them) changes
    assert not diff[:20].any() and not diff[:, :28].any() and not diff[83:, :92].any()


def test_label_is_drawn_above_box() -> None:
    img = _image()
    with_masks = draw_instances(img, _instances(with_masks=False), NAMES)
    tag = _changed(with_masks, img)[25:40, 30:70]  # strip just above box 0's top edge
    assert tag.mean() > 0.3  # filled background + text
    ink = with_masks[25:40, 30:70].reshape(-1, 3)
    assert len(np.unique(ink, axis=0)) >= 2  # text differs from the tag background


def test_boxes_only_threshold_and_tensor_input() -> None:
    img = _image()
    inst = _instances(with_masks=False)
    out = draw_instances(torch.from_numpy(img).permute(2, 0, 1), inst, NAMES, score_threshold=0.5)
    diff = _changed(out, img)
    assert diff[40, 30:70].all()  # top edge of box 0
    assert not diff[45:75, 35:65].any()  # no mask -> box interior untouched
    assert not diff[:, 92:].any()  # score 0.4 < 0.5 -> instance 1 not drawn


def test_zero_instances_returns_image_unchanged() -> None:
    img = _image()
    out = draw_instances(img, Instances.empty((H, W), with_scores=True, with_masks=True), NAMES)
    assert np.array_equal(out, img)
    filtered = draw_instances(img, _instances(), NAMES, score_threshold=0.99)
    assert np.array_equal(filtered, img)


def test_colors_override_and_legend() -> None:
    img = _image()
    red, blue = (255, 0, 0), (0, 0, 255)
    out = draw_instances(
        img, _instances(), NAMES, colors=[red, blue], alpha=1.0, legend={"28": red, "56": blue}
    )
    assert tuple(out[60, 50]) == red and tuple(out[80, 110]) == blue
    corner = out[:12, W - 12 :]
    assert _changed(corner, img[:12, W - 12 :]).any()  # legend panel in the top-right corner
    with pytest.raises(ValueError, match="colors"):
        draw_instances(img, _instances(), NAMES, colors=[red])


def test_mask_size_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="masks"):
        draw_instances(np.zeros((50, 50, 3), np.uint8), _instances(), NAMES)


def test_save_overlay(tmp_path: Path) -> None:
    path = save_overlay(tmp_path / "sub" / "overlay.png", _image(), _instances(), NAMES)
    with Image.open(path) as im:
        assert im.size == (W, H) and im.mode == "RGB"


def test_plot_loss_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    history = [
        {
            "iter": 20 * i,
            "loss": 2.0 * np.exp(-i / 30) + 0.1 * rng.random(),
            "loss_fcos_cls": float(np.exp(-i / 20)),
            "loss_mask": 0.0 if i == 3 else 0.5,
            "lr": 0.01,
        }
        for i in range(1, 120)
    ]
    history.append({"iter": 2400, "loss": torch.tensor(0.2)})  # missing terms are fine
    path = plot_loss_curves(history, tmp_path / "curves" / "loss.png", smoothing_window=10)
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn


def test_plot_loss_curves_draws_model_statistics_below(tmp_path: Path) -> None:
    history = [{"iter": i, "loss": 1.0 / i, "loss_mask": 0.5 / i} for i in range(1, 60)]
    plain = plot_loss_curves(history, tmp_path / "plain.png")
    for i, entry in enumerate(history):
        entry |= {f"msm/pick_{s}": (i % 4 == k) * 1.0 for k, s in enumerate((14, 28, 56, 112))}
    both = plot_loss_curves(history, tmp_path / "both.png")
    with Image.open(plain) as a, Image.open(both) as b:
        assert b.size[0] == a.size[0] and b.size[1] > 1.4 * a.size[1]  # a second panel
        lower = np.asarray(b.convert("L"))[b.size[1] * 2 // 3 :]
        assert len(np.unique(lower)) > 10  # with lines in it


def test_plot_loss_curves_empty_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_loss_curves([], tmp_path / "loss.png")
    with pytest.raises(ValueError, match="loss"):
        plot_loss_curves([{"iter": 1, "lr": 0.1}], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
