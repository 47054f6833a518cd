"""The page at ``/`` of ``dynaseg serve`` in a real browser: headless Chromium (Debian's package,
which ``make install`` installs when missing) driven by Playwright, against a real server.

Pick an image, then drop one, see the overlay and the table, move the score threshold, download
the JSON; the page loads nothing from elsewhere and breaks no Content-Security-Policy rule.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import serving
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright
from pycocotools import mask as mask_utils

from dynaseg.config.presets import load_config
from dynaseg.engine.checkpoint import save_weights
from dynaseg.inference.predictor import Predictor
from dynaseg.modeling.build import build_model
from dynaseg.serve import ServeLimits, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
H, W = 96, 128


def _image_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PICKED = _image_png(seed=1)


@dataclass(frozen=True)
class Served:
    url: str
    default_threshold: float  # the server's --score-threshold: half the instances of PICKED


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    torch.manual_seed(0)
    cfg = load_config("blendmask_tiny", ["model.fcos.score_threshold=0.0"])
    weights = tmp_path_factory.mktemp("page") / "tiny.safetensors"
    names = [f"thing{i}" for i in range(cfg.model.num_classes)]
    save_weights(build_model(cfg.model), weights, metadata={"class_names": names})
    predictor = Predictor(cfg, weights, device="cpu")
    scores = predictor(np.asarray(Image.open(io.BytesIO(PICKED)))).scores
    default = round(float(scores.median()), 3)
    app = create_app(predictor, limits=ServeLimits(), score_threshold=default)
    with serving(app, ServeLimits()) as base:
        yield Served(base, default)


@pytest.fixture(scope="module")
def browser_page(served) -> Iterator[tuple[Page, list[str], list[str]]]:
    assert CHROMIUM, (
        "chromium is not installed: `make install` installs it (apt-get install chromium)"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(accept_downloads=True)
        errors: list[str] = []
        requested: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requested.append(r.url))
        try:
            yield page, errors, requested
        finally:
            browser.close()


def _rows(page: Page) -> list[list[str]]:
    return page.eval_on_selector_all(
        "#instances tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )


def _expected(url: str, png: bytes, threshold: float) -> list[dict]:
    answer = httpx.post(
        f"{url}/predict",
        content=png,
        headers={"Content-Type": "image/png"},
        params={"score_threshold": threshold},
        timeout=30,
    )
    return answer.json()["instances"]


def _area(rle: dict) -> int:
    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))


def _wait_for_table(page: Page, count: int) -> None:
    # Playwright's own waiting: wait_for_function would eval a string, which the policy forbids.
    expect(page.locator("#instances tbody tr")).to_have_count(count, timeout=20_000)


def _canvas_differs_from(page: Page, png: bytes) -> float:
    """Share of canvas pixels that are not those of the image (the overlay's masks)."""
    original = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.int16)
    data = page.evaluate(
        "() => { const c = document.getElementById('canvas');"
        " return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"
    )
    drawn = np.asarray(data, dtype=np.int16).reshape(original.shape)
    return float((np.abs(drawn - original).max(axis=2) > 2).mean())


def test_page_is_served_with_a_strict_policy(served):
    url = served.url
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "connect-src 'self'" in policy and "http" not in policy
    assert r.headers["x-content-type-options"] == "nosniff"
    for asset in ("/static/page.js", "/static/page.css"):
        assert httpx.get(f"{url}{asset}").status_code == 200
    assert "//" not in r.text.replace("<!doctype html>", "")  # no other origin referenced


def test_pick_threshold_download_and_drop(served, browser_page, tmp_path):
    url, default = served.url, served.default_threshold
    page, errors, requested = browser_page
    page.goto(f"{url}/")
    expect(page.locator("#model")).to_contain_text("blendmask")
    assert float(page.input_value("#threshold")) == default  # the server's default

    # Pick an image: the table lists the instances at the default threshold, the canvas shows them.
    picked = PICKED
    (tmp_path / "picked.png").write_bytes(picked)
    page.set_input_files("#file", str(tmp_path / "picked.png"))
    expected = _expected(url, picked, default)
    assert 3 < len(expected) < len(_expected(url, picked, 0.0))
    _wait_for_table(page, len(expected))
    rows = _rows(page)
    assert [r[1] for r in rows] == [d["class_name"] for d in expected]
    assert [float(r[2]) for r in rows] == pytest.approx([d["score"] for d in expected], abs=1e-3)
    assert [int(r[3]) for r in rows] == [_area(d["mask"]) for d in expected]  # RLE decoded
    assert page.eval_on_selector("#canvas", "c => [c.width, c.height]") == [W, H]
    assert _canvas_differs_from(page, picked) > 0.02  # masks and boxes drawn

    # Move the threshold: the table follows without asking the server again.
    predictions = sum("/predict" in u for u in requested)
    everything = _expected(url, picked, 0.0)
    page.fill("#threshold", "0")
    _wait_for_table(page, len(everything))
    cut = round(everything[len(everything) // 4]["score"], 3)
    page.fill("#threshold", str(cut))
    kept = [d for d in everything if d["score"] >= cut]
    _wait_for_table(page, len(kept))
    assert sum("/predict" in u for u in requested) == predictions

    # Download the JSON: what the table shows.
    with page.expect_download() as download:
        page.click("#download")
    document = json.loads(Path(download.value.path()).read_text())
    assert document["score_threshold"] == cut and document["image"] == {"width": W, "height": H}
    assert [d["score"] for d in document["instances"]] == [d["score"] for d in kept]
    assert document["instances"][0]["mask"]["size"] == [H, W]

    # Drop another image on the drop zone.
    dropped = _image_png(seed=2)
    page.evaluate(
        """async (b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const zone = document.getElementById("drop");
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        }""",
        base64.b64encode(dropped).decode(),
    )
    _wait_for_table(page, len(_expected(url, dropped, cut)))
    assert "instances at score" in page.inner_text("#status")

    assert not errors, errors  # no script error, no Content-Security-Policy violation
    assert all(u.startswith(url) or u.startswith("blob:") for u in requested), requested
