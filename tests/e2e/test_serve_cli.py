"""``dynaseg serve``: a panoptic model over HTTP, and the ``serve`` command itself (a subprocess, flag errors).

The model is a randomly initialised tiny preset (detections at score threshold 0), which is all
the service needs: the tests check the HTTP contract, the limits and bounded concurrency.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import REPO, serving
from PIL import Image
from serve_cases import INSTANCE, LIMITS, PANOPTIC
from serve_cases import decode_rle as _decode_rle
from serve_cases import encode as _encode
from serve_cases import image as _image
from serve_cases import post as _post
from serve_cases import weights as _weights

from dynaseg import cli
from dynaseg.inference.predictor import Predictor
from dynaseg.serve import ServeLimits, create_app


def _serving(app, limits: ServeLimits = LIMITS):
    return serving(app, limits)


@pytest.fixture(scope="module")
def instance_model(tmp_path_factory) -> tuple[object, Path]:
    return _weights(tmp_path_factory.mktemp("serve"), *INSTANCE)


# --------------------------------------------------------------------------- panoptic
def test_panoptic_model(tmp_path):
    cfg, weights = _weights(tmp_path, *PANOPTIC)
    panoptic = Predictor(cfg, weights, device="cpu")
    assert panoptic.is_panoptic
    h, w = 80, 96
    with (
        _serving(create_app(panoptic, limits=LIMITS, score_threshold=0.0)) as base,
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        info = c.get("/model").json()
        assert info["panoptic"] is True and info["stuff_names"] == ["stuff_0", "stuff_1"]
        assert info["stuff_category_ids"] == [8, 9]
        body = _post(c, _encode(_image(h, w))).json()
        segments = body["segments"]
        assert segments and {s["isthing"] for s in segments} >= {False}
        covered = np.zeros((h, w), np.int64)
        for s in segments:
            m = _decode_rle(s["mask"])
            assert m.shape == (h, w) and int(m.sum()) == s["area"]
            covered += m
            assert s["class_name"] == (
                f"thing{s['class_id']}" if s["isthing"] else f"stuff_{s['class_id']}"
            )
        assert covered.max() <= 1  # segments do not overlap
        assert all(_decode_rle(d["mask"]).shape == (h, w) for d in body["instances"])
        r = _post(c, _encode(_image(h, w)), params={"format": "png"})
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (w, h)


# --------------------------------------------------------------------------- CLI
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_end_to_end(instance_model, tmp_path):
    """``dynaseg serve`` as a subprocess: /health comes up, /predict answers, limits apply."""
    _, weights = instance_model
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynaseg",
            "serve",
            "--config",
            INSTANCE[0],
            *INSTANCE[1],
            "--weights",
            str(weights),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--score-threshold",
            "0",
            "--max-bytes",
            "100000",
            "--max-pixels",
            "20000",
            "--max-concurrency",
            "1",
            "--queue-size",
            "4",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "dynaseg serve did not come up"
                with contextlib.suppress(httpx.TransportError):
                    if c.get("/health").status_code == 200:
                        break
                time.sleep(0.2)
            assert c.get("/model").json()["limits"] == {
                "max_bytes": 100000,
                "max_pixels": 20000,
                "max_concurrency": 1,
                "queue_size": 4,
                "read_timeout_s": 60.0,
                "min_upload_rate": 16384,
                "upload_grace_s": 5.0,
                "max_connections": 256,
                "header_timeout_s": 10.0,
                "keep_alive_s": 5.0,
                "send_timeout_s": 30.0,
            }
            r = _post(c, _encode(_image(96, 128)))
            assert r.status_code == 200 and r.json()["instances"], r.text
            assert _post(c, b"\x00" * 100_001).status_code == 413
            r = _post(c, _encode(_image(150, 150)))
            assert r.status_code == 413 and "20000 pixels" in r.json()["detail"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert "POST /predict" in (tmp_path / "serve.log").read_text()


def test_cli_serve_bad_flags_are_one_line_errors(capsys):
    assert (
        cli.main(
            [
                "serve",
                "--config",
                "blendmask_tiny",
                "--weights",
                "missing.safetensors",
                "--max-concurrency",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("dynaseg: error: ") and "max_concurrency must be at least 1" in err
    assert err.count("\n") == 1
    assert (
        cli.main(["serve", "--config", "blendmask_tiny", "--weights", "missing.safetensors"]) == 2
    )
    assert "missing.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "99999"], "--port must be in 0..65535 (0: any free port), got 99999"),
        (["--device", "cuda:7"], "--device cuda:7: "),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}: "),
    ],
)
def test_cli_serve_checks_port_and_device_before_loading(capsys, flags, message):
    """One line, exit status 2, before the model loads (its weights file does not even exist)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        flags = [f.replace("{busy}", port) for f in flags]
        argv = ["serve", "--config", "blendmask_tiny", "--weights", "missing.safetensors", *flags]
        assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynaseg: error: " + message.replace("{busy}", port)), err
    assert err.count("\n") == 1 and "missing.safetensors" not in err
