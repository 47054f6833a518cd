"""Train and evaluate on the papers' other datasets' files: LVIS v1 (images named by coco_url,
federated evaluation, repeat-factor sampling) and Cityscapes (converted gtFine, official AP)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from dynaseg.config.presets import load_config
from dynaseg.data.cityscapes import convert_cityscapes
from dynaseg.engine.trainer import train


def _as_lvis(coco_json: Path, split: str, out: Path) -> Path:
    """The synthetic split as an LVIS v1 file: no file_name (coco_url instead), no iscrowd,
    a frequency per category, negative and not-exhaustive lists per image."""
    data = json.loads(coco_json.read_text())
    cat_ids = [c["id"] for c in data["categories"]]
    for k, c in enumerate(data["categories"]):
        c["frequency"] = "rcf"[k % 3]
    data["annotations"] = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
    present: dict[int, set[int]] = {}
    for a in data["annotations"]:
        a.pop("iscrowd", None)
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    for image in data["images"]:
        image["coco_url"] = f"http://images.example.org/{split}/{image.pop('file_name')}"
        here = present.get(image["id"], set())
        image["neg_category_ids"] = [c for c in cat_ids if c not in here][:3]
        image["not_exhaustive_category_ids"] = sorted(here)[:1]
    path = out / f"lvis_{split}.json"
    path.write_text(json.dumps(data))
    return path


def test_mask_rcnn_trains_and_evaluates_on_lvis_files(synth_dir, tmp_path, caplog):
    train_json = _as_lvis(synth_dir / "annotations" / "instances_train.json", "train", tmp_path)
    val_json = _as_lvis(synth_dir / "annotations" / "instances_val.json", "val", tmp_path)
    out = tmp_path / "run"
    cfg = load_config(
        "mask_rcnn_tiny",
        [
            f"data.train_json={train_json}",
            f"data.train_images={synth_dir}",  # the root: coco_url names "<split>/<file>"
            f"data.val_json={val_json}",
            f"data.val_images={synth_dir}",
            "data.repeat_threshold=0.5",
            "solver.max_iter=2",
            "model.box_head.score_threshold=0.0",
            "model.box_head.detections_per_image=300",
            f"output_dir={out}",
        ],
    )
    with caplog.at_level(logging.INFO, logger="dynaseg"):
        result = train(cfg)
    assert "repeat-factor sampling (t=0.5)" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    for iou_type in ("bbox", "segm"):
        assert {"APr", "APc", "APf"} <= set(metrics[iou_type])
    assert result.metrics["segm"]["AP"] == metrics["segm"]["AP"]


def _cityscapes_tree(root: Path) -> None:
    """One 64x128 image per split: two cars, a person, a car group, void pixels."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        ids = np.full((64, 128), 7, np.uint16)  # road
        ids[:6] = 0  # unlabeled: void
        ids[10:30, 10:40], ids[12:40, 60:90] = 26_000, 26_001
        ids[35:60, 100:115] = 24_000
        ids[50:60, 0:30] = 26  # car group
        for folder, name, array in (
            ("gtFine", "gtFine_instanceIds", ids),
            ("leftImg8bit", "leftImg8bit", rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)),
        ):
            (root / folder / split / "ulm").mkdir(parents=True)
            Image.fromarray(array).save(
                root / folder / split / "ulm" / f"ulm_000000_000001_{name}.png"
            )


def test_mask_rcnn_trains_and_evaluates_on_converted_cityscapes(tmp_path):
    _cityscapes_tree(tmp_path / "cs")
    paths = convert_cityscapes(tmp_path / "cs", tmp_path / "coco")
    out = tmp_path / "run"
    cfg = load_config(
        "mask_rcnn_tiny",
        [f"data.{k}={v}" for k, v in paths.items()]
        + ["model.num_classes=8", "solver.max_iter=2", "model.box_head.score_threshold=0.0"]
        + [f"output_dir={out}"],
    )
    train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["cityscapes"]) == {"AP", "AP50"}  # the official metric, next to COCO's
    assert "segm" in metrics and "bbox" in metrics
