"""Mask R-CNN and DynaMask through the whole engine: train, evaluate with resolution statistics, predict."""
import json

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
