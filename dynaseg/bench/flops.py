"""Multiply-accumulates per model and per stage (``dynaseg bench flops``).

The models are the ones ``bench speed`` times (``prepare_models``: untrained, N detections forced,
the same image), each run once under ``torch.utils.flop_counter.FlopCounterMode`` (with our
``deform_conv2d`` formula). Stages are attributed with the speed benchmark's hooks and exclusive
accounting, with the flop counter's running total as the clock instead of wall time. Counted:
convolutions and matrix products (FlopCounterMode's ops); not counted: elementwise ops, sampling
(RoIAlign, grid_sample), NMS. Units: GMAC (FlopCounterMode counts 2 FLOPs per MAC).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dynaseg.bench.mask_head import mask_head_flops
from dynaseg.bench.speed import prepare_models
from dynaseg.bench.stages import STAGES, StageTimer, stage_hooks
from dynaseg.layers.flop_count import CUSTOM_FLOP_FORMULAS
from dynaseg.modeling.dynamask.branch import DynaMaskBranch

__all__ = ["run_flops_benchmark", "format_flops_table"]


class _CountingTimer(StageTimer):
    """A ``StageTimer`` whose clock is a ``FlopCounterMode``'s total (FLOPs)."""

    def __init__(self) -> None:
        self.counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS)
        super().__init__(clock=lambda: float(self.counter.get_total_flops()))


def run_flops_benchmark(
    configs: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    peer: str | None = "torchvision-maskrcnn",
    image_size: tuple[int, int] = (800, 1216),
    detections: int = 100,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[str]]:
    """GMAC of one inference per model (``prepare_models`` arguments), in total and per stage.

    Returns rows: ``model``, ``backbone``, ``total_gmac``, ``stages_gmac`` ({stage: GMAC} over
    ``STAGES``, ``post`` = total − the others), ``detections``, ``mask_gmac_per_instance`` (mask
    stage / detections); two-stage models add the per-resolution mask-head costs of
    ``mask_head_flops`` (``mask_head_gmac_per_instance`` …); and notes.
    """
    entries, notes = prepare_models(
        configs,
        overrides=overrides,
        peer=peer,
        image_size=image_size,
        detections=detections,
        device="cpu",
        seed=seed,
        make_timer=_CountingTimer,
    )
    rows = []
    for e in entries:
        timer = e.timer
        assert isinstance(timer, _CountingTimer)
        with contextlib.ExitStack() as stack:
            stack.enter_context(stage_hooks(targets=e.targets, timer=timer))
            stack.enter_context(torch.inference_mode())
            stack.enter_context(timer.counter)
            timer.reset()
            count = e.run()
        total = timer.counter.get_total_flops() / 2e9
        stages = {s: timer.totals.get(s, 0.0) / 2e9 for s in STAGES if s != "post"}
        stages["post"] = max(0.0, total - sum(stages.values()))
        row: dict[str, Any] = {
            "model": e.name,
            "backbone": e.backbone,
            "total_gmac": total,
            "stages_gmac": stages,
            "detections": count,
            "has_masks": e.has_masks,
            "mask_gmac_per_instance": stages["mask"] / count if count else None,
        }
        branch = getattr(e.model, "mask_branch", None)
        if not e.is_peer and branch is not None:
            row |= mask_head_flops(e.model)
            if isinstance(branch, DynaMaskBranch):
                row["mask_policy"] = branch.policy
        rows.append(row)
    notes = [
        f"one inference at {image_size[0]}x{image_size[1]}, N = {detections} forced, untrained weights; "
        "convolutions and matrix products counted (not elementwise ops, RoIAlign, grid_sample, NMS)",
        *notes,
    ]
    return rows, notes


def format_flops_table(rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()) -> str:
    """Markdown table of ``run_flops_benchmark`` rows (GMAC), followed by the notes as a list."""
    head = ["model", "backbone", "total GMAC", *STAGES, "mask GMAC / instance", "detections"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for r in rows:
        per = (
            "—"
            if r["mask_gmac_per_instance"] is None or not r.get("has_masks", True)
            else f"{r['mask_gmac_per_instance']:.3f}"
        )
        cells = [
            str(r["model"]),
            str(r["backbone"]),
            f"{r['total_gmac']:.1f}",
            *(f"{r['stages_gmac'][s]:.1f}" for s in STAGES),
            per,
            str(r["detections"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)
