"""Learning-rate schedule shapes that presets and benchmarks share."""

from __future__ import annotations

__all__ = ["dynamask_phase2_steps"]


def dynamask_phase2_steps(msm_start_iter: int, max_iter: int) -> tuple[int, int]:
    """The paper's phase-2 schedule on any length: LR x0.1 after 8/12 and 11/12 of phase 2 (the
    phase after ``msm_start_iter``), the full LR before, phase 1 included."""
    phase2 = max_iter - msm_start_iter
    return (msm_start_iter + round(phase2 * 8 / 12), msm_start_iter + round(phase2 * 11 / 12))
