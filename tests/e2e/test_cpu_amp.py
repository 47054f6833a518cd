"""``solver.amp`` on a CPU: bf16 autocast where the CPU has native bf16, float32 elsewhere; in
training and in ``bench train``."""

import logging

import pytest
import torch
from helpers import data_overrides
from safetensors.torch import load_file
from torch import nn

from dynaseg.bench.train_speed import (
    format_train_table,
    our_train_step,
    run_train_benchmark,
    synthetic_batch,
)
from dynaseg.config.presets import load_config
from dynaseg.engine import trainer as trainer_module
from dynaseg.modeling.build import build_model


@pytest.mark.parametrize("native", [True, False], ids=["native_bf16", "no_bf16"])
@pytest.mark.parametrize(
    "preset", ["blendmask_tiny", "mask_rcnn_tiny", "dynamask_tiny", "dr1mask_tiny"]
)
def test_cpu_amp_autocasts_to_bf16_only_where_the_cpu_has_it(
    preset, native, synth_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: native)
    cfg = load_config(
        preset,
        data_overrides(synth_dir)
        + [f"output_dir={tmp_path}", "data.val_json=", "solver.amp=true", "solver.max_iter=2"],
    )
    model = build_model(cfg.model)
    conv_dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: conv_dtypes.add(out.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="dynaseg.train"):
        result = trainer_module.train(cfg, model=model)

    assert conv_dtypes == ({torch.bfloat16} if native else {torch.float32})
    assert ("no native bf16" in caplog.text) is not native
    # Autocast changes the compute, never the stored weights: float32, updated, finite.
    weights = load_file(str(result.weights))
    assert {v.dtype for k, v in weights.items() if v.is_floating_point()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(weights[k], before[k]) for k in weights)


def test_bench_train_times_each_config_in_its_own_precision(monkeypatch):
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: True)
    rows, notes = run_train_benchmark(
        ["blendmask_tiny solver.amp=true", "blendmask_tiny"],
        peer=None,
        image_size=(64, 64),
        batch_size=1,
        iters=1,
        warmup=0,
    )
    assert [r["precision"] for r in rows] == ["bf16", "fp32"]
    assert "| bf16 |" in format_train_table(rows, notes)


def test_bench_train_step_runs_the_forward_under_autocast(monkeypatch):
    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: True)
    cfg = load_config("blendmask_tiny")
    model = build_model(cfg.model).train()
    conv_dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: conv_dtypes.add(out.dtype))
    images, targets = synthetic_batch(image_size=(64, 64), batch_size=1, num_classes=7)
    step = our_train_step(
        model,
        torch.optim.SGD(model.parameters(), lr=1e-4),
        images=images,
        targets=targets,
        size_divisibility=cfg.model.size_divisibility,
        amp=True,
    )
    step()
    assert conv_dtypes == {torch.bfloat16}
