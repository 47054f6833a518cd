"""Mask R-CNN and DynaMask through the whole engine: train, evaluate with resolution statistics, predict."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import data_overrides

from dynaseg.config.presets import load_config
from dynaseg.engine.trainer import train

# DynaMask's run uses a budget every selection exceeds, so phase 2 must log it: 2 % of its own 112
# cost, below its 14 path's 4.1 % (at 5 % a batch that picks 14 everywhere logs no budget).
_EXTRA = {"dynamask_tiny": ["model.dynamask.budget_target=0.02"]}


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory):
    """Trains each preset once, on first use (20 iterations; DynaMask's MSM phase starts at 10)."""
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            overrides = data_overrides(synth_dir) + [f"output_dir={out}"] + _EXTRA.get(name, [])
            done[name] = train(load_config(name, overrides))
        return done[name]

    return get


@pytest.fixture(params=["mask_rcnn_tiny", "dynamask_tiny"])
def two_stage_run(request, runs):
    return request.param, runs(request.param)


def test_trains_and_reports_resolutions(two_stage_run):
    from dynaseg.modeling.build import build_model

    name, result = two_stage_run
    assert set(json.loads((result.output_dir / "metrics.json").read_text())) == {
        "bbox",
        "segm",
        "boundary",
    }
    stats = json.loads((result.output_dir / "mask_resolutions.json").read_text())
    # the statistics agree with the side each detection in results_val.json carries
    results = json.loads((result.output_dir / "results_val.json").read_text())
    counts = Counter(r["mask_resolution"] for r in results)
    assert stats["num_instances"] == len(results) > 0
    assert {int(k): v for k, v in stats["overall"].items() if v} == pytest.approx(
        {side: n / len(results) for side, n in counts.items()}
    )
    if name == "mask_rcnn_tiny":
        assert set(counts) == {28}
        return
    assert set(counts) <= {14, 28, 56, 112}
    costs = build_model(
        load_config(str(result.output_dir / "config.yaml")).model
    ).mask_gmac_per_resolution()
    assert min(costs.values()) > 0.02 * costs[112]  # _EXTRA's budget binds for every selection
    assert stats["mean_gmac_per_instance"] == pytest.approx(
        sum(costs[side] * n for side, n in counts.items()) / len(results)
    )
    history = [
        json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    phase1 = [h for h in history if h["iter"] < 10]
    phase2 = [h for h in history if h["iter"] > 10]
    assert phase1 and phase2
    assert all(h.get("loss_budget", 0) == 0 for h in phase1)  # the MSM is off: no budget term
    assert all(h["loss_budget"] > 0 for h in phase2)  # on: the binding budget shows
    # the MSM's statistics are logged in phase 2 only, and are not part of the logged loss
    sides = (14, 28, 56, 112)
    assert not any(k.startswith("msm/") for h in phase1 for k in h)
    for h in phase2:
        assert sum(h[f"msm/pick_{s}"] for s in sides) == pytest.approx(1.0)
        assert sum(h[f"msm/prob_{s}"] for s in sides) == pytest.approx(1.0)
        assert sum(h[f"msm/argmax_{s}"] for s in sides) == pytest.approx(1.0)
        assert 1 / 4 <= h["msm/confidence"] <= 1
        assert h["loss"] == pytest.approx(sum(v for k, v in h.items() if k.startswith("loss_")))


@pytest.mark.parametrize("policy", ["size", "14", "112"])
def test_dynamask_policy_switch_without_retraining(runs, policy, tmp_path):
    from dynaseg.engine.evaluate import evaluate_model
    from dynaseg.inference.predictor import Predictor

    result = runs("dynamask_tiny")
    cfg = load_config(str(result.output_dir / "config.yaml"), [f"model.dynamask.policy={policy}"])
    predictor = Predictor(cfg, result.weights)
    metrics = evaluate_model(predictor.cfg, predictor.model, predictor.device, output_dir=tmp_path)
    results = json.loads((tmp_path / "results_val.json").read_text())
    assert results
    costs = predictor.model.mask_gmac_per_resolution()
    if policy != "size":
        assert {r["mask_resolution"] for r in results} == {int(policy)}
        assert metrics["mask_resolution"]["mean_gmac_per_instance"] == pytest.approx(
            costs[int(policy)]
        )
        return
    # Eq. 8 by hand on each detection, in original-image pixels (the rule is scale-invariant with
    # the image's own √(w0·h0)): k = ⌊4 + log2(√(wh)/√(w0h0))⌋ clamped to 1..4 → 14·2^(k−1)
    images = {im["id"]: im for im in json.loads(Path(cfg.data.val_json).read_text())["images"]}
    expected = []
    for r in results:
        im = images[r["image_id"]]
        ratio = math.sqrt(r["bbox"][2] * r["bbox"][3]) / math.sqrt(im["width"] * im["height"])
        expected.append(14 * 2 ** (min(max(math.floor(4 + math.log2(ratio)), 1), 4) - 1))
    agree = sum(e == r["mask_resolution"] for e, r in zip(expected, results)) / len(results)
    assert agree > 0.95  # rounding of the resized image may move a box across a bound
    assert len(set(expected)) > 1  # the val set has boxes on both sides of a bound


def test_bench_commands_json_shapes(capsys):
    from helpers import dynaseg

    from dynaseg.cli import main

    def run(*args: str) -> dict:
        assert main(list(args)) == 0
        return json.loads(capsys.readouterr().out)

    flops = run("bench", "flops", "--config", "dynamask_tiny", "--size", "128x160", "--json")
    per_side = flops["mask_head_gmac_per_instance"]
    assert list(per_side) == ["14", "28", "56", "112"]
    assert per_side["14"] < per_side["28"] < per_side["56"] < per_side["112"]
    assert flops["mask_rcnn_28_gmac_per_instance"] > 0
    timing = run(
        "bench",
        "maskhead",
        "--config",
        "dynamask_tiny",
        "--policy",
        "msm",
        "--mix",
        "0.35,0.34,0.21,0.10",
        "--instances",
        "20",
        "--size",
        "128x128",
        "--repeats",
        "1",
        "--json",
    )
    assert timing["ms_per_instance"] > 0 and timing["resolution_counts"] == {
        "14": 7,
        "28": 7,
        "56": 4,
        "112": 2,
    }
    expected = (
        7 * per_side["14"] + 7 * per_side["28"] + 4 * per_side["56"] + 2 * per_side["112"]
    ) / 20
    assert timing["gmac_per_instance"] == pytest.approx(
        expected + flops["per_instance_overhead_gmac"]
    )
    bad = dynaseg("bench", "maskhead", "--config", "dynamask_tiny", "--mix", "0.5,0.5", check=False)
    assert bad.returncode != 0 and "--mix" in bad.stderr


def test_predict_colours_by_resolution(runs, synth_dir, tmp_path):
    from helpers import dynaseg

    result = runs("dynamask_tiny")
    out = tmp_path / "vis"
    dynaseg(
        "predict",
        "--config",
        result.output_dir / "config.yaml",
        "--weights",
        result.weights,
        "--input",
        synth_dir / "val" / "000000.png",
        "--output",
        out,
        "--score-threshold",
        "0",
        "--color-by",
        "resolution",
    )
    assert (out / "000000.png").is_file()


def test_dynamask_resume_is_exact_across_the_phase_switch(synth_dir, tmp_path):
    """Killed at iteration 10 (where the MSM phase starts) and resumed: same final weights."""
    import shutil

    from safetensors.torch import load_file

    common = data_overrides(synth_dir) + ["deterministic=true", "data.val_json="]
    common += ["solver.max_iter=13"]  # three phase-2 steps after the checkpoint at 10
    full = train(load_config("dynamask_tiny", common + [f"output_dir={tmp_path / 'full'}"]))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(full.output_dir / "model_0000010.pt", resumed_dir / "model_0000010.pt")
    resumed = train(
        load_config("dynamask_tiny", common + [f"output_dir={resumed_dir}"]), resume=True
    )
    a, b = load_file(str(full.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys() and int(b["mask_branch.num_updates"]) == 13
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed DynaMask weights differ"


def test_budget_sweep_shares_phase_1_and_reports_each_row(synth_dir, tmp_path, caplog):
    from helpers import dynaseg

    from dynaseg.bench.budget_sweep import format_budget_table, parse_rows, run_budget_sweep

    # checkpoint_period 15 does not land on msm_start_iter = 10: the first row must add that checkpoint
    cfg = load_config(
        "dynamask_tiny",
        data_overrides(synth_dir)
        + [f"output_dir={tmp_path}", "solver.checkpoint_period=15", "solver.max_iter=14"]
        + ["model.box_head.detections_per_image=20"],  # 4 phase-2 steps, small evaluations
    )
    with caplog.at_level("WARNING", logger="dynaseg.bench"):
        table = run_budget_sweep(cfg, parse_rows("1.0:0.4,0.4:0.5"), tmp_path)
    # the tiny preset's cosine over 14 iterations is at 0.5 (1 + cos(10π/14)) = 19 % when phase 2
    # starts; the paper's shape on this length drops after 10 + 4·8/12 and 10 + 4·11/12
    assert "phase 2 starts at 19% of solver.base_lr (iteration 10)" in caplog.text
    assert "solver.steps=[13,14]" in caplog.text
    first, second = tmp_path / "ct1_l0.4", tmp_path / "ct0.4_l0.5"
    assert (first / "model_0000010.pt").is_file() and (second / "model_0000010.pt").is_file()
    history = [
        json.loads(line)["iter"] for line in (second / "metrics.jsonl").read_text().splitlines()
    ]
    assert min(history) > 10  # the second row trained phase 2 only
    saved = load_config(str(second / "config.yaml"))
    assert saved.model.dynamask.budget_target == pytest.approx(
        0.4 / 1.40
    )  # fraction unit: C_t / 1.40
    assert saved.model.dynamask.lambda_reg == 0.5
    assert [(r["C_t"], r["lambda2"]) for r in table] == [(1.0, 0.4), (0.4, 0.5)]
    for row in table:
        stats = json.loads((Path(row["output_dir"]) / "mask_resolutions.json").read_text())
        assert (
            sum(row["mix"].values()) == pytest.approx(1.0)
            and row["detections"] == stats["num_instances"]
        )
        assert -1 < row["delta_vs_112"] <= 1e-9 and 0 <= row["mask_AP_at_112"] <= 100
    assert json.loads((tmp_path / "table5.json").read_text())["rows"] == table
    assert "0.64 / -54% / 36.8" not in format_budget_table(
        table
    ) and "1.13 / -19% / 37.6" in format_budget_table(table)
    kept = [second / "metrics.json", second / "metrics_at_112.json"]
    stamps = [p.stat().st_mtime_ns for p in kept]
    assert (
        json.loads(kept[1].read_text())["segm"]["AP"] == table[1]["mask_AP_at_112"]
    )  # the evaluation at 112 is kept beside the row
    assert (
        run_budget_sweep(cfg, parse_rows("1.0:0.4,0.4:0.5"), tmp_path) == table
    )  # finished rows and their evaluations at 112 are read, not redone
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    bad = dynaseg("bench", "budget", "--config", "dynamask_tiny", "--rows", "0.4", check=False)
    assert bad.returncode == 2 and "dynaseg: error:" in bad.stderr and "C_t:lambda2" in bad.stderr


def test_evaluation_parses_the_val_json_once(runs, tmp_path, monkeypatch):
    """The dataset, the category map and COCOeval share one parse of ``data.val_json``."""
    from dynaseg.engine.evaluate import evaluate_model
    from dynaseg.inference.predictor import Predictor

    result = runs("mask_rcnn_tiny")
    predictor = Predictor(load_config(str(result.output_dir / "config.yaml")), result.weights)
    from dynaseg.utils import json_files

    val_json = Path(predictor.cfg.data.val_json).resolve()
    parsed = []

    def counting_open(path, *args, **kwargs):  # read_json's open: every JSON file we parse
        if Path(path).resolve() == val_json:
            parsed.append(path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(json_files, "open", counting_open, raising=False)
    evaluate_model(predictor.cfg, predictor.model, predictor.device, output_dir=tmp_path)
    assert len(parsed) == 1
