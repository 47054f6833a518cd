"""Helpers the tests import: the repository root, data overrides for a synthetic set, the CLI."""

from __future__ import annotations

import subprocess
import sys
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
