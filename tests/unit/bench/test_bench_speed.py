"""``dynaseg bench speed`` / ``bench train``: forced detection counts, stage hooks, interleaving, peers, CLI.

Tiny presets at 128×160 with one or two repeats; timings are never asserted.
"""

import json

import pytest
import torch
from torch import nn

from dynaseg.bench.peers import build_peer, peer_stage_targets
from dynaseg.bench.speed import (
    format_speed_table,
    parse_size,
    peer_inference_fn,
    run_speed_benchmark,
    time_inference,
)
from dynaseg.bench.stages import STAGES, StageTimer, stage_hooks
from dynaseg.bench.train_speed import format_train_table, synthetic_batch
from dynaseg.cli import main

SIZE = (128, 160)
TINY = ["blendmask_tiny", "mask_rcnn_tiny", "dynamask_tiny", "dr1mask_tiny"]
SPEED_KEYS = {"model", "median_ms", "p90_ms", "ratio_to_peer", "detections", "stages_ms"}


@pytest.fixture(scope="module")
def tiny_rows():
    """All tiny presets, no peer, N = 30, two interleaved repeats."""
    return run_speed_benchmark(
        TINY, peer=None, image_size=SIZE, detections=30, device="cpu", repeats=2, warmup=0
    )


@pytest.mark.parametrize("preset", TINY)
def test_forced_detections_are_exact(tiny_rows, preset):
    rows, notes = tiny_rows
    row = next(r for r in rows if r["model"] == preset)
    assert row["detections"] == row["detections_max"] == 30 and row["detections_ok"]
    assert not any("WARNING" in n for n in notes)


def test_speed_rows_have_keys_and_stages_within_total(tiny_rows):
    rows, _ = tiny_rows
    assert [r["model"] for r in rows] == TINY
    for r in rows:
        assert SPEED_KEYS <= set(r) and r["ratio_to_peer"] is None
        assert set(r["stages_ms"]) == set(STAGES)
        assert all(v >= 0 for v in r["stages_ms"].values())
        assert sum(r["stages_ms"].values()) <= r["median_ms"] * 1.001 + 1e-6
        assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
        # every model has a backbone, a detection head and a mask branch that the hooks saw
        assert (
            r["stages_ms"]["backbone+fpn"] > 0
            and r["stages_ms"]["head"] > 0
            and r["stages_ms"]["mask"] > 0
        )
    table = format_speed_table(rows, ["a note"])
    assert (
        sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1
    )  # header + rows
    assert table.splitlines()[-1] == "- a note"


def test_interleaved_round_robin_and_ratios():
    calls = []

    def fake(name, n):
        def run():
            calls.append(name)
            return n

        return run

    models = {"a": fake("a", 5), "b": fake("b", 4), "peer": fake("peer", 5)}
    rows = time_inference(models, repeats=3, warmup=1, peer="peer", expected_detections=5)
    assert calls == ["a", "b", "peer"] * 4
    by = {r["model"]: r for r in rows}
    assert by["peer"]["ratio_to_peer"] is None
    assert by["a"]["ratio_to_peer"] == pytest.approx(by["a"]["median_ms"] / by["peer"]["median_ms"])
    assert by["a"]["detections_ok"] and not by["b"]["detections_ok"] and by["b"]["detections"] == 4
    assert by["a"]["stages_ms"]["post"] == pytest.approx(
        by["a"]["median_ms"]
    )  # no timer: all in post


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.box = nn.Linear(4, 4)
        self.mask_head = nn.Linear(4, 4)  # called inside roi_heads: its time counts for "mask"

    def forward(self, x):
        return self.mask_head(self.box(x))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3)
        self.roi_heads = _Heads()

    def predict(self, x):
        return x * 2

    def forward(self, x):
        f = self.backbone(x).mean((2, 3))
        return self.roi_heads(f), self.predict(f)


def test_stage_hooks_nest_and_remove():
    model, timer = _Toy(), StageTimer()
    targets = {
        "backbone+fpn": (model.backbone,),
        "head": (model.roi_heads,),
        "mask": (model.roi_heads.mask_head, (model, "predict")),
    }
    with stage_hooks(targets=targets, timer=timer):
        model(torch.zeros(1, 3, 8, 8))
        assert set(timer.totals) == {"backbone+fpn", "head", "mask"} and not timer.open
    assert "predict" not in vars(model)
    assert not model.backbone._forward_pre_hooks and not model.roi_heads.mask_head._forward_hooks
    timer.reset()
    model(torch.zeros(1, 3, 8, 8))
    assert timer.totals == {}


def test_stage_hooks_refuse_a_missing_method():
    """A renamed method fails loudly instead of silently timing nothing."""
    with pytest.raises(AttributeError):
        stage_hooks(targets={"mask": ((_Toy(), "no_such_method"),)}, timer=StageTimer())


def test_stage_timer_exclusive_accounting():
    timer = StageTimer()
    timer.enter("head")
    timer.enter("mask")
    timer.exit()
    timer.exit()
    assert set(timer.totals) == {"head", "mask"} and not timer.open


@pytest.mark.parametrize("peer", ["torchvision-maskrcnn", "torchvision-fcos"])
def test_peer_builds_and_runs_at_tiny_size(peer):
    model = build_peer(peer, num_classes=7, device="cpu", image_size=SIZE, detections=12).eval()
    assert model.transform.min_size == (128,) and model.transform.max_size == 160
    image = torch.randint(0, 256, (3, *SIZE), dtype=torch.uint8)
    timer = StageTimer()
    with stage_hooks(targets=peer_stage_targets(model), timer=timer), torch.inference_mode():
        assert peer_inference_fn(model, image=image)() == 12
    assert {"pre", "backbone+fpn", "head"} <= set(timer.totals)
    assert ("mask" in timer.totals) == (peer == "torchvision-maskrcnn")


def test_synthetic_batch_shapes():
    images, targets = synthetic_batch(
        image_size=SIZE, batch_size=2, num_classes=7, instances_per_image=3
    )
    assert images.shape == (2, 3, *SIZE) and images.dtype == torch.uint8
    for t in targets:
        assert t.masks.shape == (3, *SIZE) and t.masks.flatten(1).any(1).all()
        assert (t.boxes[:, 2:] > t.boxes[:, :2]).all() and t.labels.max() < 7


def test_parse_size():
    assert parse_size("800x1216") == (800, 1216)
    with pytest.raises(ValueError):
        parse_size("800")


def test_cli_bench_speed_json(capsys):
    assert (
        main(
            [
                "bench",
                "speed",
                "--config",
                "blendmask_tiny",
                "--config",
                "mask_rcnn_tiny",
                "--size",
                "128x160",
                "--detections",
                "10",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [
        "blendmask_tiny",
        "mask_rcnn_tiny",
        "torchvision-maskrcnn",
    ]
    assert all(SPEED_KEYS <= set(r) and r["detections"] == 10 for r in rows)
    assert rows[-1]["ratio_to_peer"] is None and rows[0]["ratio_to_peer"] > 0


def test_cli_bench_speed_table_and_user_error(capsys):
    assert (
        main(
            [
                "bench",
                "speed",
                "--config",
                "dr1mask_tiny",
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
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("| model |") and "dr1mask_tiny" in out
    assert main(["bench", "speed", "--config", "dr1mask_tiny", "--size", "128"]) == 2
    assert "HxW" in capsys.readouterr().err


def test_cli_bench_train_json(capsys):
    assert (
        main(
            [
                "bench",
                "train",
                "--config",
                "blendmask_tiny",
                "--config",
                "dynamask_tiny",
                "--config",
                "dr1mask_panoptic_tiny",
                "--size",
                "128x160",
                "--batch",
                "1",
                "--iters",
                "1",
                "--warmup",
                "0",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [
        "blendmask_tiny",
        "dynamask_tiny",
        "dr1mask_panoptic_tiny",
        "torchvision-maskrcnn",
    ]
    for r in rows:
        assert {"model", "images_per_s", "ms_per_iter"} <= set(r)
        assert r["images_per_s"] == pytest.approx(1000 / r["ms_per_iter"])
    assert "torchvision-maskrcnn" in format_train_table(rows)
