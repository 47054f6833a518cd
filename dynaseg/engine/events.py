"""Training history: JSON lines (the source of the loss curve) plus TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynaseg.utils.files import atomic_write

__all__ = ["EventWriter", "read_history"]


class EventWriter:
    """Appends one JSON object per logged iteration to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume, entries at or after the resumed iteration are dropped first, so the file never
    holds two histories for the same iterations.
    """

    def __init__(
        self, output_dir: str | Path, *, start_iter: int = 0, tensorboard: bool = True
    ) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        kept = (
            [e for e in read_history(self.path) if e.get("iter", 0) < start_iter]
            if start_iter
            else []
        )
        text = "".join(json.dumps(e) + "\n" for e in kept)
        atomic_write(
            self.path, lambda tmp: Path(tmp).write_text(text)
        )  # a kill here keeps the old history
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(Path(output_dir) / "tensorboard"), purge_step=start_iter or None
            )

    def write(self, iteration: int, scalars: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"iter": iteration, **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The logged entries; a last line cut short by a killed process is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return entries
