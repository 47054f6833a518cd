"""The loss-curve plot every training run leaves (``loss_curve.png``): the total loss and every
``loss_*`` term against iteration, raw and as a moving average, on a log scale where possible; below
it, when the model logs any, its statistics (keys with a "/", e.g. DynaMask's ``msm/pick_56``). Drawn
with matplotlib's Agg canvas, without touching the global matplotlib backend."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["plot_loss_curves"]


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (shorter at the start), length preserved."""
    window = max(1, min(window, len(y)))
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _is_loss(key: str) -> bool:
    return key == "loss" or key.startswith("loss_")


def _is_statistic(key: str) -> bool:
    return "/" in key


def _series(
    history: Sequence[Mapping[str, Any]], wanted: Callable[[str], bool]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (iters, values)}`` for the keys ``wanted`` accepts ("loss" first, then sorted);
    non-finite values dropped."""
    keys: list[str] = []
    for entry in history:
        keys += [k for k in entry if wanted(k) and k not in keys]
    keys.sort(key=lambda k: (k != "loss", k))
    series = {}
    for key in keys:
        pts = [
            (float(e.get("iter", i)), float(e[key]))
            for i, e in enumerate(history)
            if key in e and _is_number(e[key]) and math.isfinite(float(e[key]))
        ]
        if pts:
            x, y = np.asarray(pts, dtype=np.float64).T
            series[key] = (x, y)
    return series


def _is_number(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def plot_loss_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    smoothing_window: int = 20,
    title: str = "training loss",
) -> Path:
    """Plot total loss and each ``loss_*`` term vs iteration to a PNG (~100 dpi).

    Args:
        history: entries like ``{"iter": 20, "loss": 1.2, "loss_fcos_cls": 0.4, ...}``.
        path: output PNG path (parent folders are created).
        smoothing_window: moving-average window, in logged points.
        title: figure title.

    Raises:
        ValueError: empty history, or no ``loss``/``loss_*`` values in it.
    """
    if not history:
        raise ValueError("plot_loss_curves: history is empty, nothing to plot")
    series = _series(history, _is_loss)
    if not series:
        raise ValueError(
            "plot_loss_curves: no 'loss' or 'loss_*' values in history "
            f"(keys seen: {sorted({k for e in history for k in e})})"
        )
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    statistics = _series(history, _is_statistic)
    fig = Figure(figsize=(9, 8.5 if statistics else 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if statistics else 1, 1, 1)
    log_y = all((y > 0).any() for _, y in series.values())
    palette = [f"C{k}" for k in range(10)]  # matplotlib's default colour cycle
    for k, (key, (x, y)) in enumerate(series.items()):
        total = key == "loss"
        color = "black" if total else palette[k % len(palette)]
        if log_y:
            y = np.where(y > 0, y, np.nan)  # a log axis cannot show zeros
        ax.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
        smooth = _moving_average(np.nan_to_num(y, nan=np.nanmin(y)), smoothing_window)
        ax.plot(x, smooth, color=color, linewidth=2.2 if total else 1.4, label=key)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss" + (" (log scale)" if log_y else ""))
    ax.set_title(f"{title} (faint: raw, solid: moving average over {smoothing_window})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, ncol=2 if len(series) > 6 else 1)
    if statistics:
        _plot_statistics(fig.add_subplot(2, 1, 2, sharex=ax), statistics, smoothing_window)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def _plot_statistics(
    ax: Any, series: dict[str, tuple[np.ndarray, np.ndarray]], smoothing_window: int
) -> None:
    """The model's statistics on a linear axis. A key is ``{quantity}_{member}``: one colour per
    member (``msm/pick_14`` and ``msm/prob_14``), one line style per quantity (``msm/pick_*``)."""
    split = {key: key.rsplit("_", 1) if "_" in key else [key, ""] for key in series}
    quantities = sorted({q for q, _ in split.values()})
    members = sorted({m for _, m in split.values()}, key=_numeric_first)
    styles = ["-", "--", ":", "-."]
    order = sorted(series, key=lambda k: (split[k][0], _numeric_first(split[k][1])))
    for key in order:
        (x, y), (quantity, member) = series[key], split[key]
        color = f"C{members.index(member) % 10}"
        style = styles[quantities.index(quantity) % len(styles)]
        ax.plot(x, y, color=color, alpha=0.15, linewidth=0.8)
        ax.plot(x, _moving_average(y, smoothing_window), color=color, linestyle=style, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("model statistics")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, ncol=2 if len(series) > 4 else 1)


def _numeric_first(member: str) -> tuple[int, float, str]:
    """Sort "14" < "28" < "112" as numbers, other names after them."""
    try:
        return (0, float(member), "")
    except ValueError:
        return (1, 0.0, member)
