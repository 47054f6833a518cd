"""Benchmark results as files: Markdown table, JSON rows, and an AP-vs-latency plot."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dynaseg.utils.files import atomic_write

__all__ = ["parse_ap_values", "plot_ap_vs_latency", "write_speed_report"]


def parse_ap_values(items: Sequence[str], *, models: Sequence[str]) -> dict[str, float]:
    """``["blendmask_r50_fpn_1x=37.8", ...]`` → {model: AP}; every name must be one of ``models``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise ValueError(f"--ap takes MODEL=AP (a row name of the table), got '{item}'")
        if name not in models:
            raise ValueError(
                f"--ap names '{name}', which is not a benchmarked model ({', '.join(models)})"
            )
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--ap value for '{name}' is not a number: '{value}'") from None
    return out


def plot_ap_vs_latency(
    rows: Sequence[Mapping[str, Any]], ap: Mapping[str, float], path: str | Path, *, title: str = ""
) -> Path:
    """Scatter of AP against median latency (ms, with the IQR as error bars) for the rows with an AP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["model"] in ap]
    if not points:
        raise ValueError("no benchmarked model has an AP value to plot")
    fig, axis = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    times = [r["median_ms"] for r in points]
    log_x = max(times) > 10 * min(times)  # e.g. full-112 DynaMask beside one-stage models
    middle = (max(times) * min(times)) ** 0.5 if log_x else (max(times) + min(times)) / 2
    for r in points:
        x, y = r["median_ms"], ap[r["model"]]
        err = [[x - r.get("q1_ms", x)], [r.get("q3_ms", x) - x]]
        axis.errorbar([x], [y], xerr=err, fmt="o", capsize=3)
        right = x > middle  # labels of right-hand points go to their left
        axis.annotate(
            r["model"],
            (x, y),
            textcoords="offset points",
            xytext=(-5 if right else 5, 5),
            fontsize=7,
            ha="right" if right else "left",
        )
    if log_x:
        axis.set_xscale("log")
    axis.margins(x=0.15, y=0.1)
    axis.set_xlabel("median latency per image (ms), IQR bars" + (", log scale" if log_x else ""))
    axis.set_ylabel("mask AP")
    axis.set_title(title or "accuracy per millisecond")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_speed_report(
    rows: Sequence[Mapping[str, Any]],
    notes: Sequence[str],
    markdown: str,
    output_dir: str | Path,
    *,
    ap: Mapping[str, float] | None = None,
) -> list[Path]:
    """``speed.md`` (the table and notes), ``speed.json`` (rows with their AP, notes) and, with AP
    values, ``ap_vs_latency.png`` in ``output_dir``; returns the written paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ap = dict(ap or {})
    payload = {
        "rows": [dict(r) | ({"ap": ap[r["model"]]} if r["model"] in ap else {}) for r in rows],
        "notes": list(notes),
    }
    written = [out / "speed.md", out / "speed.json"]
    atomic_write(written[0], lambda tmp: Path(tmp).write_text(markdown + "\n"))
    atomic_write(written[1], lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2) + "\n"))
    if ap:
        written.append(plot_ap_vs_latency(rows, ap, out / "ap_vs_latency.png"))
    return written
