"""Which mask resolution each detection used, overall and per class, and what it cost (DynaMask Table 9, Fig. 8)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["resolution_statistics", "format_resolution_table", "size_bucket", "SIZE_BUCKETS"]


# COCO's object-size buckets by area in pixels (box area here): small < 32², medium < 96², large.
SIZE_BUCKETS = {
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, float("inf")),
}


def size_bucket(bbox_xywh: Sequence[float]) -> str:
    """COCO size bucket of an [x, y, w, h] box by its area."""
    area = float(bbox_xywh[2]) * float(bbox_xywh[3])
    return next(name for name, (lo, hi) in SIZE_BUCKETS.items() if lo <= area < hi)


def resolution_statistics(
    results: Sequence[Mapping[str, Any]],
    category_names: Mapping[int, str],
    gmac_per_resolution: Mapping[int, float] | None = None,
    *,
    score_threshold: float = 0.0,
    category_groups: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Distribution of ``mask_resolution`` over COCO results.

    Args:
        results: COCO result dicts carrying ``mask_resolution`` (mask side, e.g. 14/28/56/112).
        category_names: COCO category id → name.
        gmac_per_resolution: mask-head GMACs per instance for each side; gives the mean cost spent.
        score_threshold: count only detections scoring at least this.
        category_groups: COCO category id → group (e.g. the supercategory, "easy" / "hard" in the
            synthetic set); adds ``"per_group_size"``: {group: {size: {"count", "mean_side", side: fraction}}},
            the paper's Fig. 8 question (at equal size, do harder shapes get larger masks?).
    Returns:
        ``{"num_instances", "overall": {side: fraction}, "per_class": {name: {side: fraction}},
        "per_size": {small|medium|large: {side: fraction}}, "mean_gmac_per_instance"}`` (sides as
        strings, for JSON; sizes by box area, COCO's 32² / 96² thresholds).
    """
    kept = [r for r in results if "mask_resolution" in r and r.get("score", 1.0) >= score_threshold]
    overall = Counter(int(r["mask_resolution"]) for r in kept)
    per_class: dict[str, Counter] = defaultdict(Counter)
    per_size: dict[str, Counter] = {name: Counter() for name in SIZE_BUCKETS}
    for r in kept:
        per_class[category_names.get(r["category_id"], str(r["category_id"]))][
            int(r["mask_resolution"])
        ] += 1
        per_size[size_bucket(r["bbox"])][int(r["mask_resolution"])] += 1
    sides = sorted(set(overall) | set(gmac_per_resolution or {}))

    def fractions(counter: Counter) -> dict[str, float]:
        total = sum(counter.values())
        return {str(s): (counter[s] / total if total else 0.0) for s in sides}

    mean_cost = None
    if gmac_per_resolution and kept:
        mean_cost = sum(gmac_per_resolution[s] * n for s, n in overall.items()) / len(kept)
    stats = {
        "num_instances": len(kept),
        "overall": fractions(overall),
        "per_class": {name: fractions(c) for name, c in sorted(per_class.items())},
        "per_size": {name: fractions(c) for name, c in per_size.items()},
        "mean_gmac_per_instance": mean_cost,
    }
    if category_groups:
        cells: dict[str, dict[str, Counter]] = defaultdict(
            lambda: {name: Counter() for name in SIZE_BUCKETS}
        )
        for r in kept:
            group = category_groups.get(r["category_id"]) or "?"
            cells[group][size_bucket(r["bbox"])][int(r["mask_resolution"])] += 1
        stats["per_group_size"] = {
            group: {
                size: {
                    "count": sum(c.values()),
                    "mean_side": (sum(s * n for s, n in c.items()) / sum(c.values()))
                    if c
                    else None,
                    **fractions(c),
                }
                for size, c in by_size.items()
            }
            for group, by_size in sorted(cells.items())
        }
    return stats


def format_resolution_table(stats: Mapping[str, Any]) -> str:
    """Plain-text table: one row overall, one per class, columns = mask sides (percent)."""
    sides = list(stats["overall"])
    groups = [f"[{g}/medium]" for g in stats.get("per_group_size", {})]
    width = (
        max([len("overall"), len("[medium]"), *map(len, stats["per_class"]), *map(len, groups)]) + 2
    )
    lines = ["mask resolution".ljust(width) + "".join(f"{s + '²':>8}" for s in sides)]
    rows = [
        ("overall", stats["overall"]),
        *stats["per_class"].items(),
        *((f"[{name}]", fr) for name, fr in stats.get("per_size", {}).items()),
    ]
    for name, fr in rows:
        lines.append(name.ljust(width) + "".join(f"{100 * fr[s]:7.1f}%" for s in sides))
    for group, by_size in stats.get("per_group_size", {}).items():
        for size, cell in by_size.items():
            if cell["count"]:
                lines.append(
                    f"[{group}/{size}]".ljust(width)
                    + "".join(f"{100 * cell[s]:7.1f}%" for s in sides)
                    + f"   mean side {cell['mean_side']:.1f} (n={cell['count']})"
                )
    if stats.get("mean_gmac_per_instance") is not None:
        lines.append(
            f"mean mask-head cost: {stats['mean_gmac_per_instance']:.3f} GMAC per instance "
            f"({stats['num_instances']} instances)"
        )
    return "\n".join(lines)
