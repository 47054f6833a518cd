"""Mask R-CNN and DynaMask through the whole engine: train, evaluate with resolution statistics, predict."""
import json

import torch

import pytest

from conftest import data_overrides
from dynaseg.config.presets import load_config
from dynaseg.engine.trainer import train


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory):
    """Trains each preset once, on first use (20 iterations; DynaMask's MSM phase starts at 10)."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            done[name] = train(load_config(name, data_overrides(synth_dir) + [f"output_dir={out}"]))
        return done[name]
    return get


@pytest.fixture(params=["mask_rcnn_tiny", "dynamask_tiny"])
def two_stage_run(request, runs):
    return request.param, runs(request.param)


def test_trains_and_reports_resolutions(two_stage_run):
    name, result = two_stage_run
    assert set(json.loads((result.output_dir / "metrics.json").read_text())) == {"bbox", "segm"}
    stats = json.loads((result.output_dir / "mask_resolutions.json").read_text())
    assert stats["num_instances"] > 0 and abs(sum(stats["overall"].values()) - 1) < 1e-6
    if name == "mask_rcnn_tiny":
        assert stats["overall"] == {"28": 1.0}
    else:
        assert set(stats["overall"]) == {"14", "28", "56", "112"}
    assert stats["mean_gmac_per_instance"] > 0
    history = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    if name == "dynamask_tiny":
        assert "loss_budget" not in history[0] or history[0]["loss_budget"] == 0     # phase 1: no MSM terms
        assert "loss_entropy" in history[-1]                                          # phase 2 reached


@pytest.mark.parametrize("policy", ["size", "14", "112"])
def test_dynamask_policy_switch_without_retraining(runs, policy):
    from dynaseg.engine.evaluate import evaluate_model
    from dynaseg.inference.predictor import Predictor

    result = runs("dynamask_tiny")
    cfg = load_config(str(result.output_dir / "config.yaml"), [f"model.dynamask.policy={policy}"])
    predictor = Predictor(cfg, result.weights)
    metrics = evaluate_model(predictor.cfg, predictor.model, predictor.device)
    overall = metrics["mask_resolution"]["overall"]
    if policy != "size":
        assert overall[policy] == 1.0
    costs = predictor.model.mask_gmac_per_resolution()
    if policy == "14":
        assert metrics["mask_resolution"]["mean_gmac_per_instance"] == pytest.approx(costs[14])


def test_bench_commands_json_shapes():
    from test_cli import dynaseg

    flops = json.loads(dynaseg("bench", "flops", "--config", "dynamask_tiny", "--json").stdout)
    per_side = flops["mask_head_gmac_per_instance"]
    assert list(per_side) == ["14", "28", "56", "112"]
    assert per_side["14"] < per_side["28"] < per_side["56"] < per_side["112"]
    assert flops["mask_rcnn_28_gmac_per_instance"] > 0
    timing = json.loads(dynaseg("bench", "maskhead", "--config", "dynamask_tiny", "--policy", "msm", "--mix",
                                "0.35,0.34,0.21,0.10", "--instances", "20", "--size", "128x128", "--repeats", "1",
                                "--json").stdout)
    assert timing["ms_per_instance"] > 0 and timing["resolution_counts"] == {"14": 7, "28": 7, "56": 4, "112": 2}
    expected = (7 * per_side["14"] + 7 * per_side["28"] + 4 * per_side["56"] + 2 * per_side["112"]) / 20
    assert timing["gmac_per_instance"] == pytest.approx(expected + flops["per_instance_overhead_gmac"])
    bad = dynaseg("bench", "maskhead", "--config", "dynamask_tiny", "--mix", "0.5,0.5", check=False)
    assert bad.returncode != 0 and "--mix" in bad.stderr


def test_predict_colours_by_resolution(runs, synth_dir, tmp_path):
    from test_cli import dynaseg

    result = runs("dynamask_tiny")
    out = tmp_path / "vis"
    dynaseg("predict", "--config", result.output_dir / "config.yaml", "--weights", result.weights, "--input",
            synth_dir / "val" / "000000.png", "--output", out, "--score-threshold", "0", "--color-by", "resolution")
    assert (out / "000000.png").is_file()


def test_dynamask_resume_is_exact_across_the_phase_switch(synth_dir, tmp_path):
    """Killed at iteration 10 (where the MSM phase starts) and resumed: same final weights."""
    import shutil

    from safetensors.torch import load_file

    common = data_overrides(synth_dir) + ["deterministic=true", "data.val_json="]
    full = train(load_config("dynamask_tiny", common + [f"output_dir={tmp_path / 'full'}"]))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(full.output_dir / "model_0000010.pt", resumed_dir / "model_0000010.pt")
    resumed = train(load_config("dynamask_tiny", common + [f"output_dir={resumed_dir}"]), resume=True)
    a, b = load_file(str(full.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys() and int(b["mask_branch.num_updates"]) == 20
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed DynaMask weights differ"
