"""Shared fixtures: a small synthetic COCO dataset and a tiny trained run, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynaseg.data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(
        out, num_train=24, num_val=8, image_size=128, seed=3, max_objects=4, panoptic=False
    )
    return out


def data_overrides(root: Path, val_split: str = "val") -> list[str]:
    return [
        f"data.train_json={root}/annotations/instances_train.json",
        f"data.train_images={root}/train",
        f"data.val_json={root}/annotations/instances_{val_split}.json",
        f"data.val_images={root}/{val_split}",
    ]


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
