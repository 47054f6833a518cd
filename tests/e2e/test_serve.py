"""``dynaseg serve``: a real uvicorn server on localhost driven by httpx (and a raw socket).

The model is a randomly initialised tiny preset (detections at score threshold 0), which is all
the service needs: the tests check the HTTP contract, the limits and bounded concurrency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import statistics
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import serving
from PIL import Image
from serve_cases import INSTANCE, LIMITS, MAX_BYTES, MAX_PIXELS
from serve_cases import decode_rle as _decode_rle
from serve_cases import encode as _encode
from serve_cases import image as _image
from serve_cases import post as _post
from serve_cases import weights as _weights

from dynaseg.inference.predictor import Predictor
from dynaseg.serve import RequestError, ServeLimits, create_app
from dynaseg.serve.images import probe_image


# --------------------------------------------------------------------------- helpers
def _png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares width x height RGB pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _serving(app, limits: ServeLimits = LIMITS):
    return serving(app, limits)


class _HookedModel:
    """A model whose ``predict_raw`` (what the service runs per image) goes through ``hook``."""

    def __init__(self, inner, hook) -> None:
        self._inner, self._hook = inner, hook

    def predict_raw(self, *args, **kwargs):
        return self._hook(self._inner.predict_raw, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class CountingPredictor:
    """Wraps a predictor and records the most images that were ever in its model at once."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.active = self.max_active = self.calls = 0
        self._lock = threading.Lock()
        self.model = _HookedModel(inner.model, self.run_model)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def run_model(self, predict_raw, *args, **kwargs):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return predict_raw(*args, **kwargs)
        finally:
            with self._lock:
                self.active -= 1


class BlockingPredictor(CountingPredictor):
    """Blocks every image until ``release`` is set (deterministic queue tests)."""

    def __init__(self, inner: Predictor) -> None:
        super().__init__(inner)
        self.release = threading.Event()

    def run_model(self, predict_raw, *args, **kwargs):
        assert self.release.wait(timeout=30)
        return super().run_model(predict_raw, *args, **kwargs)


class FailingPredictor(CountingPredictor):
    def run_model(self, predict_raw, *args, **kwargs):
        raise RuntimeError("secret internal state /home/model")


def _post_once(base: str, body: bytes) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=30) as c:
        return _post(c, body)


def _assert_healthy(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = _post(client, _encode(_image(40, 48, seed=9)))
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def instance_model(tmp_path_factory) -> tuple[object, Path]:
    return _weights(tmp_path_factory.mktemp("serve"), *INSTANCE)


@pytest.fixture(scope="module")
def predictor(instance_model) -> CountingPredictor:
    cfg, weights = instance_model
    return CountingPredictor(Predictor(cfg, weights, device="cpu"))


@pytest.fixture(scope="module")
def url(predictor) -> Iterator[str]:
    with _serving(create_app(predictor, limits=LIMITS, score_threshold=0.0)) as base:
        yield base


@pytest.fixture
def client(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


# --------------------------------------------------------------------------- endpoints
def test_health_and_model(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert health["queue"] == {
        "running": 0,
        "waiting": 0,
        "sending": 0,
        "max_concurrency": 2,
        "queue_size": 32,
    }
    assert health["uploads"] == {"count": 0, "bytes": 0}
    info = client.get("/model").json()
    assert (
        info["config"]["model"]["kind"] == "blendmask"
        and info["config"]["model"]["num_classes"] == 7
    )
    assert info["class_names"] == [f"thing{i}" for i in range(7)] and info["panoptic"] is False
    assert "stuff_names" not in info
    assert info["torch_version"] == torch.__version__ and info["device"] == "cpu"
    assert info["dynaseg_version"] and info["limits"]["max_bytes"] == MAX_BYTES
    schema = client.get("/openapi.json").json()["paths"]["/predict"]["post"]
    assert set(schema["requestBody"]["content"]) == {"image/*", "multipart/form-data"}
    assert {p["name"] for p in schema["parameters"]} == {"format", "score_threshold"}


def test_predict_json(client):
    h, w = 96, 128
    r = _post(client, _encode(_image(h, w)))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["image"] == {"width": w, "height": h}
    instances = body["instances"]
    assert len(instances) > 5
    scores = [d["score"] for d in instances]
    assert scores == sorted(scores, reverse=True)
    for d in instances:
        assert d["class_name"] == f"thing{d['class_id']}" and d["category_id"] == d["class_id"] + 1
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        assert isinstance(d["mask"]["counts"], str) and d["mask"]["size"] == [h, w]
        assert _decode_rle(d["mask"]).shape == (h, w)
    # The query threshold filters the same prediction.
    cut = sorted(scores)[len(scores) // 2]
    kept = _post(client, _encode(_image(h, w)), params={"score_threshold": cut}).json()["instances"]
    assert 0 < len(kept) < len(instances) and all(d["score"] >= cut - 1e-5 for d in kept)


def test_predict_png_by_query_and_accept(client):
    h, w = 72, 100
    for kwargs in ({"params": {"format": "png"}}, {"headers": {"Accept": "image/png"}}):
        headers = {"Content-Type": "image/jpeg", **kwargs.get("headers", {})}
        r = client.post(
            "/predict",
            content=_encode(_image(h, w), "JPEG"),
            headers=headers,
            params=kwargs.get("params"),
        )
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        overlay = Image.open(io.BytesIO(r.content))
        assert overlay.format == "PNG" and overlay.size == (w, h)
    # An explicit ?format=json wins over Accept.
    r = client.post(
        "/predict",
        params={"format": "json"},
        content=_encode(_image(h, w)),
        headers={"Content-Type": "image/png", "Accept": "image/png"},
    )
    assert r.headers["content-type"] == "application/json"


def test_predict_multipart_upload(client):
    h, w = 64, 80
    r = client.post(
        "/predict", files={"file": ("photo.jpg", _encode(_image(h, w), "JPEG"), "image/jpeg")}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": w, "height": h} and body["instances"]
    assert all(_decode_rle(d["mask"]).shape == (h, w) for d in body["instances"])
    r = client.post(
        "/predict",
        files={"file": ("photo.png", _encode(_image(h, w)), "application/octet-stream")},
        params={"format": "png"},
    )
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (w, h)


# --------------------------------------------------------------------------- limits
def _chunks(total: int, size: int = 16_384) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"\x00" * min(size, total - start)


PNG = {"Content-Type": "image/png"}
LIMIT_CASES = {  # id → (kwargs for client.post("/predict", ...), status, words in the detail)
    "too_many_bytes": (
        lambda: dict(content=b"\x00" * (MAX_BYTES + 1), headers=PNG),
        413,
        ["exceeds the limit of 200000 bytes"],
    ),
    "chunked_without_length": (
        lambda: dict(content=_chunks(3 * MAX_BYTES), headers=PNG),
        413,
        ["exceeds the limit"],
    ),
    "too_many_pixels": (
        lambda: dict(content=_encode(np.zeros((300, 300, 3), np.uint8)), headers=PNG),
        413,
        ["300x300", "limit of 65536 pixels"],
    ),
    "decompression_bomb": (
        lambda: dict(content=_png_declaring(30000, 30000), headers=PNG),
        413,
        ["decompression bomb"],
    ),
    "wrong_content_type": (
        lambda: dict(content=_encode(_image()), headers={"Content-Type": "text/plain"}),
        415,
        ["unsupported content type 'text/plain'"],
    ),
    "no_content_type": (
        lambda: dict(content=_encode(_image())),
        415,
        ["missing Content-Type header"],
    ),
    "form_urlencoded": (
        lambda: dict(data={"file": "abc"}),
        415,
        ["application/x-www-form-urlencoded"],
    ),
    "garbage_bytes": (
        lambda: dict(content=os.urandom(5000), headers={"Content-Type": "image/jpeg"}),
        422,
        ["not a supported image"],
    ),
    "truncated_png": (
        lambda: dict(content=_encode(_image())[:3000], headers=PNG),
        422,
        ["truncated"],
    ),
    "empty_body": (lambda: dict(content=b"", headers=PNG), 400, ["empty"]),
    "multipart_without_file": (
        lambda: dict(files={"image": ("a.png", _encode(_image()), "image/png")}),
        400,
        ["'file' field"],
    ),
    "multipart_text_part": (
        lambda: dict(files={"file": ("a.txt", b"hello", "text/plain")}),
        415,
        ["text/plain"],
    ),
    "multipart_too_big": (
        lambda: dict(files={"file": ("a.png", b"\x00" * MAX_BYTES, "image/png")}),
        413,
        ["limit"],
    ),
    "score_threshold_not_a_number": (
        lambda: dict(content=_encode(_image()), headers=PNG, params={"score_threshold": "high"}),
        422,
        ["score_threshold"],
    ),
    "score_threshold_out_of_range": (
        lambda: dict(content=_encode(_image()), headers=PNG, params={"score_threshold": "1.5"}),
        422,
        ["score_threshold"],
    ),
    "unknown_format": (
        lambda: dict(content=_encode(_image()), headers=PNG, params={"format": "gif"}),
        422,
        ["format"],
    ),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_limit_is_a_4xx_json_message(client, case):
    make_kwargs, status, words = LIMIT_CASES[case]
    r = client.post("/predict", **make_kwargs())
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    assert all(word in detail for word in words), detail
    if case == "chunked_without_length":
        assert "content-length" not in r.request.headers
    _assert_healthy(client)


def _raw_http(url: str, request: bytes) -> bytes:
    """Send raw bytes (from a thread, since the server may answer before reading them all) and read
    the answer until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:

        def send() -> None:
            with contextlib.suppress(OSError):
                s.sendall(request)

        sender = threading.Thread(target=send)
        sender.start()
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
        sender.join(timeout=30)
    return answer


def test_lying_content_length_with_chunked_body(url, client):
    """Content-Length says 100 bytes, the chunked body carries 3x the limit: counted while streaming."""
    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"\x00" * 65536
    body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (
        3 * MAX_BYTES // len(chunk) + 1
    ) + b"0\r\n\r\n"
    answer = _raw_http(url, head + body)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'{"detail":"request body exceeds the limit of 200000 bytes"}' in answer
    _assert_healthy(client)


def test_content_length_shorter_than_body(url, client):
    """Content-Length says 10 bytes of a PNG: only those are read (422); the rest is not a request."""
    answer = _raw_http(
        url,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 10\r\n\r\n" + _encode(_image()),
    )
    assert answer.startswith(b"HTTP/1.1 422 "), answer[:300]
    _assert_healthy(client)


def test_stalled_upload_times_out_and_holds_no_place(predictor):
    """A body that stops arriving holds no admission place (the only one serves others) and is
    answered 408 once it falls behind the minimum rate, after the grace period."""
    limits = dataclasses.replace(
        LIMITS, max_concurrency=1, queue_size=0, upload_grace_s=0.5, min_upload_rate=1000
    )
    with (
        _serving(create_app(predictor, limits=limits), limits) as base,
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            t0 = time.monotonic()
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 1000\r\n\r\n" + b"\x00" * 10
            )
            deadline = time.monotonic() + 10
            while c.get("/health").json()["uploads"]["count"] != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert _post(c, _encode(_image(40, 48))).status_code == 200
            answer = b""
            while chunk := s.recv(65536):  # the server closes the connection after the 408
                answer += chunk
            waited = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request body too slow: 10 bytes" in answer
        assert 0.5 <= waited < 3, waited
        assert c.get("/health").json()["uploads"] == {"count": 0, "bytes": 0}


def test_probe_rejects_bomb_even_above_max_pixels():
    """Pillow's own decompression-bomb guard applies whatever --max-pixels allows."""
    with pytest.raises(RequestError) as err:
        probe_image(_png_declaring(30000, 30000), max_pixels=10**12)
    assert err.value.status == 413 and "decompression bomb" in err.value.detail
    assert probe_image(_png_declaring(30, 20), max_pixels=600) == (30, 20)
    with pytest.raises(RequestError) as err:
        probe_image(_png_declaring(30, 20), max_pixels=599)
    assert err.value.status == 413 and "30x20 = 600 pixels" in err.value.detail


def test_limits_validation():
    with pytest.raises(ValueError, match="max_concurrency"):
        ServeLimits(max_concurrency=0)
    with pytest.raises(ValueError, match="queue_size"):
        ServeLimits(queue_size=-1)
    with pytest.raises(ValueError, match="read_timeout_s"):
        ServeLimits(read_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        ServeLimits(max_connections=1)
    with pytest.raises(ValueError, match="min_upload_rate"):
        ServeLimits(min_upload_rate=0)


# --------------------------------------------------------------------------- errors and queueing
def test_unexpected_error_is_a_generic_500(predictor, caplog):
    failing = FailingPredictor(predictor.inner)
    with (
        _serving(create_app(failing, limits=LIMITS)) as base,
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        r = _post(c, _encode(_image()))
        assert r.status_code == 500
        assert r.json() == {"detail": "internal server error while segmenting the image"}
        assert "secret" not in r.text and "Traceback" not in r.text
        assert c.get("/health").json()["status"] == "ok"
    assert "segmentation failed" in caplog.text and "secret internal state" in caplog.text


def test_unexpected_error_outside_predict_is_a_generic_500(predictor, caplog):
    class BrokenConfig(CountingPredictor):
        @property
        def cfg(self):
            raise RuntimeError("secret")

    with (
        _serving(create_app(BrokenConfig(predictor.inner), limits=LIMITS)) as base,
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        r = c.get("/model")
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        assert "secret" not in r.text
        assert c.get("/health").status_code == 200  # same keep-alive connection
    assert "unhandled error on GET /model" in caplog.text


def _wait_for(client: httpx.Client, **queue: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = client.get("/health").json()["queue"]
        if all(state[k] == v for k, v in queue.items()):
            return
        time.sleep(0.01)
    raise AssertionError(f"queue never reached {queue}: {state}")


def test_queue_overflow_is_503(predictor):
    """One running, one queued: the third request is refused at once with 503 and Retry-After."""
    blocking = BlockingPredictor(predictor.inner)
    limits = ServeLimits(
        max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_concurrency=1, queue_size=1
    )
    image = _encode(_image(48, 64))
    with (
        _serving(create_app(blocking, limits=limits, score_threshold=0.0), limits) as base,
        httpx.Client(base_url=base, timeout=30) as c,
        ThreadPoolExecutor(2) as pool,
    ):
        first = pool.submit(_post_once, base, image)
        _wait_for(c, running=1, waiting=0)
        second = pool.submit(_post_once, base, image)
        _wait_for(c, running=1, waiting=1)
        refused = _post(c, image)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "server busy" in refused.json()["detail"]
        blocking.release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        _wait_for(c, running=0, waiting=0)
        assert _post(c, image).status_code == 200
    assert blocking.max_active == 1 and blocking.calls == 3


def test_load_bounded_concurrency(url, predictor):
    """16 clients x 4 requests against the tiny model: all answered, never more than
    max_concurrency images in inference at once. Latency and throughput are printed."""
    clients, per_client = 16, 4
    images = [_encode(_image(96, 128, seed=s)) for s in range(clients)]
    barrier = threading.Barrier(clients)
    predictor.max_active = 0

    def run(k: int) -> list[tuple[int, float]]:
        out = []
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            for _ in range(per_client):
                t0 = time.perf_counter()
                r = _post(c, images[k])
                out.append((r.status_code, time.perf_counter() - t0))
        return out

    with httpx.Client(base_url=url, timeout=60) as c:  # one client alone, for reference
        alone = []
        for k in range(8):
            t0 = time.perf_counter()
            assert _post(c, images[k]).status_code == 200
            alone.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(run, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    assert [s for s, _ in results] == [200] * (clients * per_client)
    assert 1 <= predictor.max_active <= LIMITS.max_concurrency
    latencies = sorted(t for _, t in results)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(
        f"\nserve load: {clients} clients x {per_client} requests (96x128 PNG, blendmask_tiny, "
        f"max_concurrency {LIMITS.max_concurrency}, torch threads {torch.get_num_threads()}): "
        f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, {len(results) / wall:.1f} requests/s; "
        f"one client alone: p50 {statistics.median(alone) * 1e3:.0f} ms"
    )
