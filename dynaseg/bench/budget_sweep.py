"""DynaMask's budget sweep (paper Table 5) on any data: one model per (C_t, λ2) row, phase 1 shared.

The first row trains from scratch and keeps a checkpoint at ``msm_start_iter`` (the end of phase 1,
where the budget starts to act); every other row starts from a copy of that checkpoint and trains
phase 2 with its own C_t and λ2, so the rows differ only where the paper's rows do. Each finished
model is evaluated twice: with the MSM's argmax (the row's cost and accuracy) and with every
instance at 112×112 (the same weights at full cost, for "AP within 1.5 of full 112"). A rerun reads
finished rows and both evaluations from the row folders.

Rows are given in the paper's unit (G per instance, as Table 5 prints them) and converted to the
config's ``budget_unit`` (a "fraction" head gets C_t / 1.40).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from dynaseg.config.overrides import with_overrides
from dynaseg.config.schedules import dynamask_phase2_steps
from dynaseg.config.schema import ExperimentConfig
from dynaseg.utils.files import atomic_write

__all__ = ["BudgetRow", "PAPER_TABLE5", "parse_rows", "run_budget_sweep", "format_budget_table"]

logger = logging.getLogger("dynaseg.bench")

PAPER_112_GFLOPS = 1.40
# Table 5 of the paper: (C_t, λ2) → (GFLOPs, Δ vs 1.40 G in %, mask AP on COCO val)
PAPER_TABLE5: dict[tuple[float, float], tuple[float, int, float]] = {
    (1.0, 0.3): (1.27, -9, 37.6),
    (1.0, 0.4): (1.13, -19, 37.6),
    (1.0, 0.5): (1.06, -24, 37.5),
    (0.8, 0.4): (0.92, -34, 37.4),
    (0.6, 0.4): (0.83, -41, 37.2),
    (0.4, 0.4): (0.64, -54, 36.8),
}


@dataclasses.dataclass(frozen=True)
class BudgetRow:
    """One row: C_t in the paper's G per instance, λ2."""

    target: float
    lambda_reg: float

    @property
    def name(self) -> str:
        return f"ct{self.target:g}_l{self.lambda_reg:g}"


def parse_rows(text: str) -> list[BudgetRow]:
    """``"1.0:0.4,0.4:0.4"`` → rows; ValueError naming the bad item."""
    rows = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            target, lam = (float(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"--rows: '{item}' is not C_t:lambda2 (e.g. 0.4:0.4)") from None
        if target <= 0 or lam < 0:
            raise ValueError(f"--rows: '{item}' needs C_t > 0 and lambda2 >= 0")
        rows.append(BudgetRow(target, lam))
    if not rows:
        raise ValueError("--rows: no rows given")
    return rows


def _row_config(cfg: ExperimentConfig, row: BudgetRow, root: Path) -> ExperimentConfig:
    d = cfg.model.dynamask
    target = row.target / PAPER_112_GFLOPS if d.budget_unit == "fraction" else row.target
    return with_overrides(
        cfg,
        {
            "output_dir": str(root / row.name),
            "model.dynamask.budget_target": target,
            "model.dynamask.lambda_reg": row.lambda_reg,
            "model.dynamask.policy": "msm",
        },
    )


def _phase1_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The first row also checkpoints at the end of phase 1 (checkpoint timing changes no weight)."""
    start, period = cfg.model.dynamask.msm_start_iter, cfg.solver.checkpoint_period
    if start <= 0 or start % period == 0:
        return cfg
    return with_overrides(cfg, {"solver.checkpoint_period": start})


def _evaluate_at_112(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    """The row's final weights with every instance at 112×112. Kept in ``metrics_at_112.json`` so that
    a rerun of the sweep reads it instead of evaluating again."""
    from dynaseg.engine.evaluate import evaluate_model
    from dynaseg.inference.predictor import Predictor

    saved = out / "metrics_at_112.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    cfg112 = with_overrides(cfg, {"model.dynamask.policy": "112"})
    predictor = Predictor(cfg112, out / "model_final.safetensors")
    metrics = evaluate_model(predictor.cfg, predictor.model, predictor.device)
    atomic_write(saved, lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    return metrics


def _warn_if_phase2_is_decayed(cfg: ExperimentConfig) -> None:
    """The paper trains phase 2 at the full LR (a fresh 12-epoch schedule, §4.1). On a schedule that
    has already decayed when the MSM switches on, the MSM learns little (docs/dynamask_budget.md)."""
    from dynaseg.engine.optim import lr_factor

    start = cfg.model.dynamask.msm_start_iter
    factor = lr_factor(start, cfg.solver)
    if factor < 0.5:
        logger.warning(
            "phase 2 starts at %.0f%% of solver.base_lr (iteration %d); the paper trains it at the "
            "full LR with x0.1 after 8/12 and 11/12 of it: solver.lr_schedule=multistep "
            "solver.steps=[%d,%d]",
            100 * factor,
            start,
            *dynamask_phase2_steps(start, cfg.solver.max_iter),
        )


def run_budget_sweep(
    cfg: ExperimentConfig, rows: list[BudgetRow], root: Path
) -> list[dict[str, Any]]:
    """Train and evaluate every row under ``root``; rows already finished (``metrics.json`` present)
    are read, not retrained. Returns one dict per row (also written to ``root/table5.json``)."""
    from dynaseg.engine.trainer import train
    from dynaseg.modeling.build import build_model

    if cfg.model.kind != "dynamask":
        raise ValueError(f"the budget sweep needs a DynaMask config, got {cfg.model.kind}")
    start = cfg.model.dynamask.msm_start_iter
    _warn_if_phase2_is_decayed(cfg)
    head_costs = build_model(cfg.model, pretrained=False).mask_branch.gmac_per_resolution()
    phase1: Path | None = None
    table = []
    for i, row in enumerate(rows):
        row_cfg = _row_config(cfg, row, root)
        out = Path(row_cfg.output_dir)
        if not (
            out / "metrics.json"
        ).is_file():  # not finished: start, or continue where it stopped
            if i == 0:
                row_cfg = _phase1_config(row_cfg)
            elif start > 0 and not any(out.glob("model_*.pt")):
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(phase1, out / phase1.name)  # resume picks it up: phase 2 starts here
            train(row_cfg, resume=True)
        if i == 0:
            phase1 = out / f"model_{start:07d}.pt"
            if start > 0 and not phase1.is_file():
                raise FileNotFoundError(
                    f"{phase1}: the first row kept no checkpoint at the end of phase 1"
                )
        metrics = json.loads((out / "metrics.json").read_text())
        stats = json.loads((out / "mask_resolutions.json").read_text())
        mix = {int(side): frac for side, frac in stats["overall"].items()}
        gmac = sum(head_costs[side] * frac for side, frac in mix.items())
        full = _evaluate_at_112(row_cfg, out)
        table.append(
            {
                "C_t": row.target,
                "lambda2": row.lambda_reg,
                "budget_target_in_config": row_cfg.model.dynamask.budget_target,
                "gmac_per_detection": gmac,
                "delta_vs_112": gmac / head_costs[112] - 1,
                "mask_AP": metrics["segm"]["AP"],
                "mask_AP75": metrics["segm"]["AP75"],
                "mask_AP_at_112": full["segm"]["AP"],
                "mix": {str(s): f for s, f in sorted(mix.items())},
                "detections": stats["num_instances"],
                "output_dir": str(out),
            }
        )
    (root / "table5.json").write_text(
        json.dumps({"head_gmac_per_resolution": head_costs, "rows": table}, indent=2)
    )
    return table


def format_budget_table(rows: list[dict[str, Any]]) -> str:
    """Our rows beside the paper's Table 5 (its FLOPs, Δ and AP are on COCO with the R50 head)."""
    head = (
        f"{'C_t':>5} {'λ2':>4} {'GMAC':>7} {'Δ':>6} {'AP':>6} {'AP75':>6} {'AP@112':>7}   "
        f"{'14²':>5} {'28²':>5} {'56²':>5} {'112²':>5}   paper: G / Δ / AP"
    )
    lines = [head]
    for r in rows:
        paper = PAPER_TABLE5.get((r["C_t"], r["lambda2"]))
        mix = "".join(f"{100 * r['mix'].get(s, 0.0):5.0f}%" for s in ("14", "28", "56", "112"))
        lines.append(
            f"{r['C_t']:5.2f} {r['lambda2']:4.2f} {r['gmac_per_detection']:7.3f} "
            f"{100 * r['delta_vs_112']:5.0f}% {r['mask_AP']:6.1f} {r['mask_AP75']:6.1f} "
            f"{r['mask_AP_at_112']:7.1f}  {mix}   "
            + (f"{paper[0]:.2f} / {paper[1]}% / {paper[2]}" if paper else "—")
        )
    return "\n".join(lines)
