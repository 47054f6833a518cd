"""Train and evaluate on LVIS v1-format files: images named by coco_url, federated evaluation,
repeat-factor sampling, the per-class table split by frequency."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dynaseg.config.presets import load_config
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
