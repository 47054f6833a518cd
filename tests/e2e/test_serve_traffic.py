"""``dynaseg serve`` under hostile and careless traffic (issue 15): a real server process on
localhost, the traffic that used to hurt it, and the bound that now holds, measured on the process
(/proc/<pid>: peak RSS, open files) and in its log.

One server for the module, with small limits so each case shows its bound in a second or two: a
tiny BlendMask whose weights make every detection cover the whole image with a full mask (the worst
case for memory), 100 detections with distinct scores; ``ulimit -n 128``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

from dynaseg.config.presets import load_config
from dynaseg.engine.checkpoint import save_weights
from dynaseg.modeling.build import build_model
from dynaseg.serve.logs import RepeatFilter

PRESET = "blendmask_tiny"
OVERRIDES = [
    "model.fcos.score_threshold=0.0",
    "model.fcos.nms_threshold=1.0",  # keep all 100: every box is the whole image
    "model.fcos.max_detections=100",
]
SIDE = 700  # the largest image the server allows: SIDE x SIDE = MAX_PIXELS
MAX_PIXELS = SIDE * SIDE
MAX_BYTES = 2_000_000
FD_LIMIT = 128  # ulimit -n of the server: --max-connections 256 is lowered to 128 - 64 = 64
MAX_CONNECTIONS = FD_LIMIT - 64
PLACES = 1 + 3  # --max-concurrency 1 --queue-size 3
# SEND_TIMEOUT leaves a loaded CI machine time to produce all PLACES replies while the first is held.
HEADER_TIMEOUT, SEND_TIMEOUT, UPLOAD_GRACE, MIN_RATE = 1.0, 5.0, 1.0, 20_000
# Peak memory of one running request beyond the idle server (docs/serve.md, "Bounded memory"):
# 24 bytes per pixel of the largest image, plus the model's working set at its test size.
BYTES_PER_PIXEL = 24
FIXED_BYTES = 40 * 2**20  # A: the tiny model at 192 px, thread stacks, allocator slack


# --------------------------------------------------------------------------- the server
def _worst_case_weights(path: Path) -> None:
    """Every location predicts a box beyond the image (clipped: the whole image) and every mask is
    full; class scores differ a little per location, so a threshold picks the top k."""
    torch.manual_seed(0)
    cfg = load_config(PRESET, OVERRIDES)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.fcos_head.cls_logits.weight.normal_(0, 0.01)
        model.fcos_head.cls_logits.bias.fill_(3.0)
        model.fcos_head.bbox_pred.weight.zero_()
        model.fcos_head.bbox_pred.bias.fill_(1e4)
        model.basis.predictor.weight.zero_()
        model.basis.predictor.bias.fill_(2.0)
    names = [f"thing{i}" for i in range(cfg.model.num_classes)]
    save_weights(model, path, metadata={"class_names": names})


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


@dataclass
class Server:
    url: str
    host: str
    port: int
    pid: int
    log: Path

    def status_mb(self, key: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve_traffic")
    weights = folder / "worst.safetensors"
    _worst_case_weights(weights)
    log = folder / "serve.log"
    flags = {
        "--max-pixels": MAX_PIXELS,
        "--max-bytes": MAX_BYTES,
        "--max-concurrency": 1,
        "--queue-size": PLACES - 1,
        "--upload-grace": UPLOAD_GRACE,
        "--min-upload-rate": MIN_RATE,
        "--header-timeout": HEADER_TIMEOUT,
        "--send-timeout": SEND_TIMEOUT,
        "--score-threshold": 0,
    }
    command = [sys.executable, "-m", "dynaseg", "serve", "--config", PRESET, *OVERRIDES]
    command += ["--weights", str(weights), "--port", "0", "--device", "cpu"]
    command += [str(v) for flag, value in flags.items() for v in (flag, value)]
    with log.open("w") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=_limit_open_files,
        )
    try:
        port = _wait_for_port(proc, log)
        server = Server(f"http://127.0.0.1:{port}", "127.0.0.1", port, proc.pid, log)
        with httpx.Client(base_url=server.url, timeout=30) as c:  # one warm-up request
            assert _post(c, _noise_png(64)).status_code == 200
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_for_port(proc: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        for line in log.read_text().splitlines():
            if line.startswith("dynaseg serve: http://"):
                port = int(line.split(":")[3].split("/")[0])
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        return port
        time.sleep(0.1)
    raise AssertionError("dynaseg serve did not come up: " + log.read_text()[-3000:])


# --------------------------------------------------------------------------- traffic helpers
def _noise_png(side: int, *, block: int = 1, seed: int = 0) -> bytes:
    """A side x side PNG of noise (``block`` > 1: upscaled, a small file of a large image)."""
    cells = np.random.default_rng(seed).integers(0, 255, (side // block, side // block, 3))
    image = Image.fromarray(cells.astype(np.uint8)).resize((side, side), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _post(client: httpx.Client, body: bytes, **params) -> httpx.Response:
    return client.post(
        "/predict", content=body, headers={"Content-Type": "image/png"}, params=params
    )


def _head(length: int, query: str = "") -> bytes:
    return (
        f"POST /predict{query} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _closed_by_server(sock: socket.socket, *, within: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``within`` seconds; None if it did not."""
    sock.settimeout(0.2)
    received, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


def _health_latency(url: str) -> float:
    with httpx.Client(base_url=url, timeout=10) as c:
        t0 = time.perf_counter()
        assert c.get("/health").status_code == 200
        return time.perf_counter() - t0


def _queue(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


# --------------------------------------------------------------------------- 1. memory
def test_peak_memory_depends_on_pixels_not_on_detections(server):
    """Before: a 109 KB PNG of 5000 x 5000 took the server from 1.1 to 8.3 GB (100 full-image
    masks materialised and copied). Now masks are pasted and encoded one at a time: the peak is
    bounded by BYTES_PER_PIXEL x MAX_PIXELS + FIXED_BYTES, the same for 1 or 100 instances."""
    image = _noise_png(SIDE, block=20)  # ~10 KB for the largest image allowed
    extra_mb = {}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        scores = [d["score"] for d in _post(c, image).json()["instances"]]  # and a warm-up
        assert len(scores) == 100 and scores[0] > scores[1] and scores[9] > scores[10]
        for name, fmt, count in [
            ("json 1", "json", 1),
            ("json 100", "json", 100),
            ("png 10", "png", 10),
        ]:
            threshold = 0.0 if count == 100 else (scores[count - 1] + scores[count]) / 2
            time.sleep(0.2)
            idle = server.status_mb("VmRSS")
            server.reset_peak()
            r = _post(c, image, format=fmt, score_threshold=threshold)
            assert r.status_code == 200, r.text
            extra_mb[name] = server.status_mb("VmHWM") - idle
            if fmt == "json":
                assert len(r.json()["instances"]) == count
    print(f"\npeak RSS above idle at {SIDE}x{SIDE}, 100 detections: {extra_mb} MB")
    for name, extra in extra_mb.items():
        bound = (BYTES_PER_PIXEL * MAX_PIXELS + FIXED_BYTES) / 2**20
        assert extra <= bound, (name, extra, bound)
    # 100 bool masks of the image, materialised once, are 47 MB (the code before: +148 MB). What
    # is left (~7 MB): masks pasted a few at a time (2 MiB), the answer, and the heap's slack for
    # buffers of this small image (under the 1 MiB mmap threshold; at 25 MP: +26 MB for 100).
    materialised_once = 100 * MAX_PIXELS / 2**20
    assert extra_mb["json 100"] - extra_mb["json 1"] < 0.25 * materialised_once, extra_mb


# --------------------------------------------------------------------------- 2. connections
def test_idle_and_slow_header_connections_are_capped_and_timed_out(server):
    """Before: 100 idle + 100 slow-header sockets were held for 45 s (fds 9 -> 209); under
    ulimit -n 256, 300 idle sockets made /health time out and the accept error wrote 152 MB of log.
    Now (ulimit -n 128): 100 idle + 40 slow-header sockets never hold more than --max-connections,
    /health still answers, each is closed after --header-timeout, the log stays small."""
    files_before, log_before = server.open_files(), len(server.log_text())
    idle = [server.connect() for _ in range(100)]
    slow = [server.connect() for _ in range(40)]
    stop = threading.Event()

    def trickle() -> None:  # one byte of a request head every 0.3 s on each slow socket
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: " + b"x" * 100
        for i in range(len(head)):
            if stop.wait(0.3):
                return
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(head[i : i + 1])

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        latencies = [_health_latency(server.url) for _ in range(5)]
        most_files = max(server.open_files() for _ in range(5))
        closed = [_closed_by_server(s, within=HEADER_TIMEOUT + 2) for s in idle + slow]
    finally:
        stop.set()
        sender.join(timeout=5)
        for s in idle + slow:
            s.close()
    print(f"\n140 sockets: /health {max(latencies) * 1e3:.0f} ms, open files {most_files}")
    assert max(latencies) < 1.0, latencies
    assert most_files <= files_before + MAX_CONNECTIONS + 4, (files_before, most_files)
    assert all(c is not None for c in closed), sum(c is None for c in closed)
    log = server.log_text()[log_before:]
    assert len(log) < 20_000 and "Traceback" not in log, log[-2000:]
    assert "closed a connection that sent no complete request head within 1 s" in log


# --------------------------------------------------------------------------- 3. unread replies
def _kernel_send_buffer_max() -> int:
    """The most a TCP send buffer grows to (Linux autotuning): what the kernel may take of a
    reply before the server has to hold the rest."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return 4 * 2**20


def test_replies_nobody_reads_hold_places_and_are_dropped(server):
    """Before: 36 clients posting for 18 MB PNG replies and never reading: +484 MB while /health
    said 0 waiting. Now a reply keeps its admission place until it is handed over: at most
    PLACES replies are held (the rest are 503), and a client that takes none of its reply for
    --send-timeout seconds is disconnected, freeing its place.

    Each client pipelines enough requests for their replies to overflow what the kernel buffers
    per connection, so the last one stays with the server."""
    body = _noise_png(SIDE, seed=3)  # noise: the overlay PNG is as large as the image (1.4 MB)
    pipelined = _kernel_send_buffer_max() // len(body) + 2
    clients = 10  # their first bodies fit the upload budget (PLACES x MAX_BYTES)
    request = _head(len(body), "?format=png&score_threshold=1") + body
    idle = server.status_mb("VmRSS")
    server.reset_peak()
    socks = []
    for _ in range(clients):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing, buffers little
        s.connect((server.host, server.port))
        socks.append(s)
    senders = [threading.Thread(target=_send_quietly, args=(s, request * pipelined)) for s in socks]
    for sender in senders:
        sender.start()
    try:
        deadline, queue = time.monotonic() + 30, {}
        while time.monotonic() < deadline:  # every admitted reply is stuck in sending
            queue = _queue(server.url)["queue"]
            if queue["sending"] == PLACES:
                break
            time.sleep(0.05)
        assert queue["sending"] == PLACES and queue["running"] == queue["waiting"] == 0, queue
        held_mb = server.status_mb("VmHWM") - idle
        # Read nothing until the server has dropped them: reading would let the replies go out.
        deadline = time.monotonic() + SEND_TIMEOUT + 5
        while _queue(server.url)["queue"]["sending"] and time.monotonic() < deadline:
            time.sleep(0.1)
        answers = [_closed_by_server(s, within=5) for s in socks]
    finally:
        for s in socks:
            s.close()
        for sender in senders:
            sender.join(timeout=10)
    print(
        f"\n{clients} clients x {pipelined} unread PNG replies of {len(body) >> 10} KB: "
        f"peak +{held_mb:.0f} MB"
    )
    assert all(a is not None for a in answers)  # all closed: refused after their 503, or dropped
    statuses = sorted(a[:12].decode() for a in answers)
    assert statuses == ["HTTP/1.1 200"] * PLACES + ["HTTP/1.1 503"] * (clients - PLACES), statuses
    reply_mb = 3 * MAX_PIXELS / 2**20
    one_request_mb = (BYTES_PER_PIXEL * MAX_PIXELS + FIXED_BYTES) / 2**20
    assert held_mb < PLACES * reply_mb + one_request_mb, held_mb
    assert _queue(server.url)["queue"]["sending"] == 0
    dropped = f"disconnected a client that took none of its reply for {SEND_TIMEOUT:g} s"
    assert dropped in server.log_text()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes; it may close the connection first."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


# --------------------------------------------------------------------------- 4. slow bodies
def test_slow_bodies_are_cut_early_and_hold_no_place(server):
    """Before: 17 clients sending 1 byte every 2 s got every real request 503 for the whole
    --read-timeout. Now bodies are read before a request takes a place, and one that falls behind
    --min-upload-rate after --upload-grace is answered 408 at once."""
    slow = [server.connect() for _ in range(17)]
    for s in slow:
        s.sendall(_head(100_000))
    t0, stop = time.monotonic(), threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            for s in slow:
                with contextlib.suppress(OSError):
                    s.send(b"\x00")

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 5
        while _queue(server.url)["uploads"]["count"] < 17:
            assert time.monotonic() < deadline, _queue(server.url)
            time.sleep(0.02)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            statuses = [_post(c, _noise_png(64), score_threshold=1).status_code for _ in range(3)]
            assert _queue(server.url)["queue"]["waiting"] == 0
        answers = [_closed_by_server(s, within=UPLOAD_GRACE + 3) for s in slow]
        cut_after = time.monotonic() - t0
    finally:
        stop.set()
        sender.join(timeout=5)
        for s in slow:
            s.close()
    assert statuses == [200, 200, 200]
    assert all(a is not None and a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[:2]
    assert b"request body too slow" in answers[0]
    assert cut_after < UPLOAD_GRACE + 3, cut_after


# --------------------------------------------------------------------------- 5. parsing off the loop
def _png_of_empty_chunks(total_bytes: int) -> bytes:
    """A 16 x 16 PNG padded with empty private chunks (12 bytes each) to about ``total_bytes``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
    tail = chunk(b"IDAT", zlib.compress(b"\x00" * (16 * 49))) + chunk(b"IEND", b"")
    empty = chunk(b"prIv", b"")
    return head + empty * ((total_bytes - len(head) - len(tail)) // len(empty)) + tail


def test_header_parsing_runs_off_the_event_loop(server):
    """Before: a 16 MB PNG of 1.4 million empty private chunks stalled /health for 2.5 s while its
    header was checked on the event loop. Now every parse runs in a worker thread: 1 MB of such
    chunks takes a second or so to parse (twice: header check, decoding), /health does not wait."""
    bomb = _png_of_empty_chunks(MAX_BYTES // 2)
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.url, timeout=60) as c:
        t0 = time.perf_counter()
        answer = pool.submit(_post, c, bomb, score_threshold=1)
        latencies = []
        while not answer.done():
            latencies.append(_health_latency(server.url))
        took = time.perf_counter() - t0
        assert answer.result().status_code in (200, 422)
    print(f"\n{len(bomb) // 12} empty chunks: {took:.2f} s; /health at most {max(latencies):.3f} s")
    assert took > 0.3 and len(latencies) >= 3  # the parse takes a while...
    assert max(latencies) < 0.25, latencies  # ...and /health does not wait for it


# --------------------------------------------------------------------------- 6. disconnects
def test_client_disconnects_log_one_info_line(server):
    """Before: 200 disconnects mid-body wrote 600 KB of tracebacks in 1 s. Now one info line each,
    and repeats beyond a few per 10 s are counted, not written."""
    before = len(server.log_text())
    for _ in range(30):
        with server.connect() as s:
            s.sendall(_head(100_000) + b"\x00" * 1000)
        time.sleep(0.01)
    time.sleep(0.5)
    log = server.log_text()[before:]
    assert "Traceback" not in log and len(log) < 3000, log
    lines = [line for line in log.splitlines() if "client disconnected" in line]
    assert 1 <= len(lines) <= 5 and "INFO" in lines[0], log
    assert "client disconnected after 1000 bytes of its body: POST /predict" in lines[0]
    assert _health_latency(server.url) < 1


def test_repeat_filter_counts_what_it_drops():
    records = []
    log = logging.getLogger("dynaseg.test_repeat_filter")
    log.propagate = False
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    log.addFilter(RepeatFilter(burst=3, window_s=0.2))
    for i in range(1000):
        log.error("accept failed %d", i, exc_info=ValueError("EMFILE"))
    time.sleep(0.25)
    log.error("accept failed %d", 1000)
    messages = [r.getMessage() for r in records]
    assert messages[:3] == ["accept failed 0", "accept failed 1", "accept failed 2"]
    assert messages[3] == "accept failed 1000 (997 more like this not logged)"
    assert records[0].exc_info and not records[1].exc_info
