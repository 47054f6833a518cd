"""Shared pieces of the service tests: limits, tiny random models, images, a POST helper."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from dynaseg.config.presets import load_config
from dynaseg.engine.checkpoint import save_weights
from dynaseg.modeling.build import build_model
from dynaseg.serve import ServeLimits

MAX_BYTES, MAX_PIXELS = 200_000, 256 * 256
LIMITS = ServeLimits(max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_concurrency=2, queue_size=32)
INSTANCE = ("blendmask_tiny", ["model.fcos.score_threshold=0.0"])
PANOPTIC = ("dr1mask_panoptic_tiny", ["model.fcos.score_threshold=0.0"])


def weights(directory: Path, preset: str, overrides: list[str]) -> tuple[object, Path]:
    torch.manual_seed(0)
    cfg = load_config(preset, overrides)
    path = directory / f"{preset}.safetensors"
    names = [f"thing{i}" for i in range(cfg.model.num_classes)]
    save_weights(build_model(cfg.model), path, metadata={"class_names": names})
    return cfg, path


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def post(
    client: httpx.Client, body: bytes, content_type: str | None = "image/png", **kwargs
) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post("/predict", content=body, headers=headers, **kwargs)


def decode_rle(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
