"""Command-line smoke tests: the fixed command shapes other tooling relies on."""

import json

import numpy as np
import pytest
import torch
from helpers import data_overrides, dynaseg
from PIL import Image

from dynaseg import Predictor
from dynaseg.evaluation.coco import evaluate_coco
from dynaseg.evaluation.drawn import drawn_agreement
from dynaseg.structures import Instances


def test_eval_results_file_json_shape(tiny_run, synth_dir):
    proc = dynaseg(
        "eval",
        "--gt",
        synth_dir / "annotations/instances_val.json",
        "--results",
        tiny_run.output_dir / "results_val.json",
        "--iou-types",
        "bbox",
        "segm",
        "--json",
    )
    metrics = json.loads(proc.stdout)
    assert set(metrics) == {"bbox", "segm"}
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    saved = json.loads((tiny_run.output_dir / "metrics.json").read_text())
    assert metrics["segm"]["AP"] == saved["segm"]["AP"]


def test_eval_ground_truth_as_results_is_100(synth_dir, tmp_path):
    gt = json.loads((synth_dir / "annotations/instances_val.json").read_text())
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]
    (tmp_path / "r.json").write_text(json.dumps(results))
    proc = dynaseg(
        "eval",
        "--gt",
        synth_dir / "annotations/instances_val.json",
        "--results",
        tmp_path / "r.json",
        "--json",
    )
    metrics = json.loads(proc.stdout)
    assert metrics["bbox"]["AP"] == 100 and metrics["segm"]["AP"] == 100
    drawn = drawn_agreement(
        synth_dir / "annotations/instances_val.json", results, score_threshold=1
    )
    assert drawn["right"] == drawn["found"] == drawn["objects"] == len(results)


def test_model_eval_and_predict(tiny_run, synth_dir, tmp_path, capsys):
    from dynaseg.cli import main

    weights = str(tiny_run.weights)
    config = str(tiny_run.output_dir / "config.yaml")
    assert (
        main(["eval", "--config", config, "--weights", weights, "--output", str(tmp_path / "ev")])
        == 0
    )
    assert "AP50" in capsys.readouterr().out and (tmp_path / "ev" / "results_val.json").is_file()
    # --class-agnostic with a model: its results file, scored with the categories ignored
    ev = ["eval", "--config", config, "--weights", weights, "--output", str(tmp_path / "ev")]
    assert main([*ev, "--class-agnostic", "--json"]) == 0
    agnostic = json.loads(capsys.readouterr().out)
    aware = json.loads((tmp_path / "ev" / "metrics.json").read_text())  # with the classes
    gt = synth_dir / "annotations/instances_val.json"
    expected = evaluate_coco(gt, tmp_path / "ev" / "results_val.json", class_agnostic=True)
    assert set(agnostic) == {"bbox", "segm"}
    assert agnostic["bbox"]["AP"] == pytest.approx(expected["bbox"]["AP"])
    assert agnostic["bbox"]["AP"] != pytest.approx(aware["bbox"]["AP"])
    out = tmp_path / "pred"
    args = ["--config", config, "--weights", weights, "--input", str(synth_dir / "val")]
    assert main(["predict", *args, "--output", str(out), "--score-threshold", "0.0"]) == 0
    assert len(list(out.glob("*.png"))) == 8
    results = json.loads((out / "results.json").read_text())
    assert all(
        {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r) for r in results
    )
    # predict numbers the images 1, 2, ... and names them: --drawn-at matches them by file name
    capsys.readouterr()
    args = ["eval", "--gt", str(gt), "--results", str(out / "results.json"), "--json"]
    assert main([*args, "--drawn-at", "0"]) == 0
    drawn = json.loads(capsys.readouterr().out)["drawn"]
    num_objects = sum(not a["iscrowd"] for a in json.loads(gt.read_text())["annotations"])
    assert (drawn["drawn"], drawn["objects"]) == (len(results), num_objects)


def test_python_predictor(tiny_run, synth_dir):
    predictor = Predictor(str(tiny_run.output_dir / "config.yaml"), tiny_run.weights)
    path = synth_dir / "val" / "000000.png"
    from_path = predictor(path)
    from_array = predictor(np.asarray(Image.open(path).convert("RGB")))
    assert isinstance(from_path, Instances) and from_path.image_size == (128, 128)
    assert torch.equal(from_path.boxes, from_array.boxes)
    assert predictor.class_names[0] == "circle"


def test_bad_input_is_a_one_line_error(tmp_path):
    proc = dynaseg("train", "--config", "blendmask_tiny", "solver.max_itr=3", check=False)
    assert proc.returncode != 0 and "did you mean 'solver.max_iter'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = dynaseg(
        "train",
        "--config",
        "blendmask_tiny",
        f"data.train_json={tmp_path}/missing.json",
        f"output_dir={tmp_path}/run",
        check=False,
    )
    assert proc.returncode != 0 and "missing.json" in proc.stderr and "Traceback" not in proc.stderr


def test_train_command_with_overrides(synth_dir, tmp_path):
    proc = dynaseg(
        "train",
        "--config",
        "blendmask_tiny",
        *data_overrides(synth_dir),
        f"output_dir={tmp_path}",
        "solver.max_iter=2",
        "solver.base_lr=0.001",
    )
    assert "run folder" in proc.stdout and (tmp_path / "model_final.safetensors").is_file()
    assert "base_lr: 0.001" in (tmp_path / "config.yaml").read_text()


def test_config_and_synth_commands(tmp_path):
    assert "blendmask_r50_fpn_1x" in dynaseg("config").stdout
    assert "max_iter: 90000" in dynaseg("config", "--config", "blendmask_r50_fpn_1x").stdout
    dynaseg(
        "data", "synth", "--out", tmp_path, "--num-train", 2, "--num-val", 1, "--image-size", 64
    )
    assert (tmp_path / "annotations" / "instances_val.json").is_file()
