"""DR1Mask through the whole engine on the synthetic panoptic data: train, PQ evaluation, predict, eval --panoptic."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dynaseg.cli import main
from dynaseg.config.presets import load_config
from dynaseg.data.synthetic import generate_synthetic
from dynaseg.engine.checkpoint import read_metadata
from dynaseg.engine.trainer import train
from dynaseg.structures.panoptic import rgb_to_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def panoptic_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_panoptic")
    generate_synthetic(
        out, num_train=16, num_val=4, image_size=(96, 128), seed=5, max_objects=3, panoptic=True
    )
    return out


def _overrides(root, out):
    ann = f"{root}/annotations"
    return [
        f"data.train_images={root}/train",
        f"data.val_images={root}/val",
        f"data.train_json={ann}/instances_train.json",
        f"data.val_json={ann}/instances_val.json",
        f"data.panoptic_train_json={ann}/panoptic_train.json",
        f"data.panoptic_train_dir={ann}/panoptic_train",
        f"data.panoptic_val_json={ann}/panoptic_val.json",
        f"data.panoptic_val_dir={ann}/panoptic_val",
        "solver.max_iter=8",
        "solver.checkpoint_period=4",
        "model.dr1.panoptic_score_threshold=0.0",
        f"output_dir={out}",
    ]


@pytest.fixture(scope="module")
def panoptic_run(panoptic_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("dr1_panoptic_run")
    return train(load_config("dr1mask_panoptic_tiny", _overrides(panoptic_synth, out)))


def test_panoptic_training_reports_pq_and_mask_ap(panoptic_run):
    metrics = json.loads((panoptic_run.output_dir / "metrics.json").read_text())
    assert set(metrics) == {"panoptic", "bbox", "segm", "boundary"}
    pq = metrics["panoptic"]
    assert (
        pq["Stuff"]["N"] == 2
        and pq["All"]["N"] == pq["Things"]["N"] + 2
        and 0 <= pq["All"]["PQ"] <= 100
    )
    per_class = json.loads((panoptic_run.output_dir / "metrics_per_class.json").read_text())[
        "panoptic"
    ]
    assert per_class["sky"]["isthing"] is False and per_class["circle"]["isthing"] is True
    predicted = json.loads((panoptic_run.output_dir / "panoptic_val.json").read_text())
    assert (
        len(predicted["annotations"]) == 4 and (panoptic_run.output_dir / "panoptic_val").is_dir()
    )
    meta = read_metadata(panoptic_run.weights)
    assert meta["stuff_names"] == ["sky", "ground"] and meta["stuff_category_ids"] == [8, 9]


def test_eval_panoptic_on_the_written_files_gives_the_same_pq(panoptic_run, panoptic_synth, capsys):
    ann, out = panoptic_synth / "annotations", panoptic_run.output_dir
    assert (
        main(
            [
                "eval",
                "--panoptic",
                "--gt-json",
                str(ann / "panoptic_val.json"),
                "--gt-dir",
                str(ann / "panoptic_val"),
                "--pred-json",
                str(out / "panoptic_val.json"),
                "--pred-dir",
                str(out / "panoptic_val"),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())["panoptic"]
    for group in ("All", "Things", "Stuff"):
        for k in ("PQ", "SQ", "RQ"):
            assert printed[group][k] == pytest.approx(metrics[group][k], nan_ok=True)


def test_predict_writes_panoptic_png_json_and_overlay(panoptic_run, panoptic_synth, tmp_path):
    out = tmp_path / "vis"
    assert (
        main(
            [
                "predict",
                "--config",
                str(panoptic_run.output_dir / "config.yaml"),
                "--weights",
                str(panoptic_run.weights),
                "--input",
                str(panoptic_synth / "val"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    predicted = json.loads((out / "panoptic.json").read_text())
    assert [c["name"] for c in predicted["categories"]][-2:] == ["sky", "ground"]
    for ann in predicted["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(out / "panoptic" / ann["file_name"])))
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}
        assert (out / ann["file_name"]).is_file()  # the overlay


@pytest.mark.slow
def test_ddp_panoptic_training_gathers_every_rank_s_predictions(panoptic_synth, tmp_path):
    """2 gloo processes: each rank predicts half of the val images into one folder; rank 0 scores all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dynaseg",
        "train",
        "--config",
        "dr1mask_panoptic_tiny",
        *_overrides(panoptic_synth, tmp_path),
        "solver.max_iter=4",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = json.loads((tmp_path / "panoptic_val.json").read_text())
    assert sorted(a["image_id"] for a in predicted["annotations"]) == [1, 2, 3, 4]
    assert "panoptic" in json.loads((tmp_path / "metrics.json").read_text())
