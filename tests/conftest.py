"""Shared fixtures: a small synthetic COCO dataset and a tiny trained run, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import data_overrides

from dynaseg.data.synthetic import generate_synthetic


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(
        out, num_train=24, num_val=8, image_size=128, seed=3, max_objects=4, panoptic=False
    )
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_dir, tmp_path_factory):
    """A 20-iteration tiny BlendMask run (config, checkpoints, final weights, metrics)."""
    from dynaseg.config.presets import load_config
    from dynaseg.engine.trainer import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(
        "blendmask_tiny", data_overrides(synth_dir) + [f"output_dir={out}", "deterministic=true"]
    )
    return train(cfg)


_TIERS = ("unit", "e2e", "export", "fuzz")


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier, the first folder under tests/ (``pytest -m unit`` runs one tier)."""
    root = Path(__file__).parent
    for item in items:
        tier = Path(str(item.fspath)).relative_to(root).parts[0]
        if tier in _TIERS:
            item.add_marker(tier)
