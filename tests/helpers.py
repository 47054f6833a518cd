"""Helpers the tests import: the repository root, data overrides for a synthetic set, the CLI, a
service on a free port."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_overrides(root: Path, val_split: str = "val") -> list[str]:
    return [
        f"data.train_json={root}/annotations/instances_train.json",
        f"data.train_images={root}/train",
        f"data.val_json={root}/annotations/instances_{val_split}.json",
        f"data.val_images={root}/{val_split}",
    ]


def dynaseg(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "dynaseg", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@contextlib.contextmanager
def serving(app, limits) -> Iterator[str]:
    """Run ``app`` as ``dynaseg serve`` runs it (uvicorn, the service's connection ``limits``) in a
    background thread on a free port; yields its base URL."""
    from dynaseg.serve import listen, make_server

    server = make_server(app, limits=limits, listener=listen("127.0.0.1", 0), log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.address[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
