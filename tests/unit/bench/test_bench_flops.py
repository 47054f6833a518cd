"""``bench flops`` (per model and stage) and the benchmark report files (Markdown, JSON, AP plot)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from dynaseg.bench.flops import format_flops_table, run_flops_benchmark
from dynaseg.bench.report import parse_ap_values, write_speed_report
from dynaseg.bench.speed import format_speed_table
from dynaseg.bench.stages import STAGES, StageTimer
from dynaseg.cli import main
from dynaseg.layers.flop_count import count_gmacs

SIZE = (128, 160)


@pytest.fixture(scope="module")
def flops_rows():
    return run_flops_benchmark(
        [
            "blendmask_tiny",
            "dr1mask_tiny",
            "mask_rcnn_tiny",
            "dynamask_tiny model.dynamask.policy=14",
            "dynamask_tiny model.dynamask.policy=112",
        ],
        peer="torchvision-maskrcnn",
        image_size=SIZE,
        detections=12,
    )


def test_stage_gmacs_add_up_and_are_positive(flops_rows):
    rows, notes = flops_rows
    assert [r["model"] for r in rows][-1] == "torchvision-maskrcnn"
    for r in rows:
        assert r["detections"] == 12
        assert sum(r["stages_gmac"].values()) == pytest.approx(r["total_gmac"], rel=1e-6)
        assert set(r["stages_gmac"]) == set(STAGES)
        for stage in ("backbone+fpn", "head", "mask"):
            assert r["stages_gmac"][stage] > 0, (r["model"], stage)
        assert r["mask_gmac_per_instance"] == pytest.approx(r["stages_gmac"]["mask"] / 12)
    assert "convolutions and matrix products" in notes[0]


def test_total_equals_an_unhooked_count(flops_rows):
    """The hooks only attribute: the total is torch's flop counter on the plain run."""
    from dynaseg.bench.speed import prepare_models

    entries, _ = prepare_models(["mask_rcnn_tiny"], peer=None, image_size=SIZE, detections=12)
    with torch.inference_mode():
        gmac, _ = count_gmacs(entries[0].run)
    row = next(r for r in flops_rows[0] if r["model"] == "mask_rcnn_tiny")
    assert row["total_gmac"] == pytest.approx(gmac, rel=1e-9)


def test_dynamask_mask_stage_follows_its_policy(flops_rows):
    rows, _ = flops_rows
    by = {r["model"]: r for r in rows}
    small, large = (
        by["dynamask_tiny model.dynamask.policy=14"],
        by["dynamask_tiny model.dynamask.policy=112"],
    )
    assert small["mask_policy"] == "14" and large["mask_policy"] == "112"
    assert large["stages_gmac"]["mask"] > 3 * small["stages_gmac"]["mask"]
    assert small["stages_gmac"]["backbone+fpn"] == pytest.approx(
        large["stages_gmac"]["backbone+fpn"]
    )
    per_side = large["mask_head_gmac_per_instance"]
    assert per_side["14"] < per_side["112"]
    table = format_flops_table(rows)
    assert table.startswith("| model |") and "torchvision-maskrcnn" in table


def test_cli_bench_flops_json_keeps_the_mask_head_keys(capsys):
    assert (
        main(
            [
                "bench",
                "flops",
                "--config",
                "dynamask_tiny",
                "--config",
                "blendmask_tiny",
                "--size",
                "128x160",
                "--detections",
                "8",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert list(out["mask_head_gmac_per_instance"]) == ["14", "28", "56", "112"]
    assert [r["model"] for r in out["models"]] == ["dynamask_tiny", "blendmask_tiny"]
    assert all(r["total_gmac"] > 0 for r in out["models"])


def test_stage_timer_with_a_custom_clock():
    ticks = iter(range(0, 1000, 10))
    timer = StageTimer(clock=lambda: float(next(ticks)))
    timer.reset()
    with timer.section("a"):
        with timer.section("b"):
            pass
    assert timer.totals == {"a": 20.0, "b": 10.0}
    assert not timer.open


# ---------------------------------------------------------------------------------------- report


ROWS = [
    {
        "model": "blendmask",
        "median_ms": 100.0,
        "p90_ms": 110.0,
        "q1_ms": 95.0,
        "q3_ms": 105.0,
        "min_ms": 90.0,
        "max_ms": 120.0,
        "ratio_to_peer": 0.8,
        "detections": 100,
        "detections_max": 100,
        "detections_ok": True,
        "repeats": 3,
        "stages_ms": {s: 10.0 for s in STAGES},
        "backbone": "R-50 FPN-256",
        "has_masks": True,
    },
    {
        "model": "peer",
        "median_ms": 125.0,
        "p90_ms": 130.0,
        "q1_ms": 120.0,
        "q3_ms": 128.0,
        "min_ms": 118.0,
        "max_ms": 131.0,
        "ratio_to_peer": None,
        "detections": 100,
        "detections_max": 100,
        "detections_ok": True,
        "repeats": 3,
        "stages_ms": {s: 20.0 for s in STAGES},
        "backbone": "R-50 FPN-256",
        "has_masks": True,
    },
]


def test_parse_ap_values():
    assert parse_ap_values(["blendmask=37.8", "peer=34.6"], models=["blendmask", "peer"]) == {
        "blendmask": 37.8,
        "peer": 34.6,
    }
    assert parse_ap_values(
        ["dynamask model.dynamask.policy=112=36.1"], models=["dynamask model.dynamask.policy=112"]
    ) == {"dynamask model.dynamask.policy=112": 36.1}
    with pytest.raises(ValueError, match="not a benchmarked model"):
        parse_ap_values(["other=1"], models=["blendmask"])
    with pytest.raises(ValueError, match="not a number"):
        parse_ap_values(["blendmask=high"], models=["blendmask"])
    with pytest.raises(ValueError, match="MODEL=AP"):
        parse_ap_values(["blendmask"], models=["blendmask"])


def test_write_speed_report_files(tmp_path):
    table = format_speed_table(ROWS, ["note"])
    paths = write_speed_report(
        ROWS, ["note"], table, tmp_path, ap={"blendmask": 37.8, "peer": 34.6}
    )
    assert [p.name for p in paths] == ["speed.md", "speed.json", "ap_vs_latency.png"]
    assert (tmp_path / "speed.md").read_text().startswith("| model |")
    data = json.loads((tmp_path / "speed.json").read_text())
    assert data["rows"][0]["ap"] == 37.8 and data["notes"] == ["note"]
    with Image.open(tmp_path / "ap_vs_latency.png") as im:
        assert im.size[0] > 300 and im.format == "PNG"
    no_ap = write_speed_report(ROWS, [], table, tmp_path / "plain")
    assert [p.name for p in no_ap] == ["speed.md", "speed.json"]


def test_cli_bench_speed_output_and_ap_errors(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "speed",
                "--config",
                "blendmask_tiny",
                "--peer",
                "none",
                "--size",
                "128x160",
                "--detections",
                "5",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--output",
                str(tmp_path),
                "--ap",
                "blendmask_tiny=12.5",
            ]
        )
        == 0
    )
    assert (tmp_path / "ap_vs_latency.png").is_file()
    assert json.loads((tmp_path / "speed.json").read_text())["rows"][0]["ap"] == 12.5
    capsys.readouterr()
    assert main(["bench", "speed", "--config", "blendmask_tiny", "--ap", "blendmask_tiny=1"]) == 2
    assert "--output" in capsys.readouterr().err
    assert (
        main(
            [
                "bench",
                "speed",
                "--config",
                "blendmask_tiny",
                "--output",
                str(tmp_path),
                "--ap",
                "x=1",
            ]
        )
        == 2
    )
    assert "not a benchmarked model" in capsys.readouterr().err


def test_count_gmacs_counts_a_conv():
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    gmac, _ = count_gmacs(lambda: conv(torch.zeros(1, 4, 10, 10)))
    assert gmac == pytest.approx(8 * 4 * 9 * 100 / 1e9)
