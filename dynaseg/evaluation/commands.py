"""``dynaseg eval``: COCO AP of a model or of a results file, PQ of panoptic prediction files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dynaseg.cli import _add_config
from dynaseg.errors import UserError

__all__ = ["add_eval_parser"]


_PANOPTIC_FLAGS = (
    ("gt_json", "--gt-json"),
    ("gt_dir", "--gt-dir"),
    ("pred_json", "--pred-json"),
    ("pred_dir", "--pred-dir"),
)


def _cmd_eval_panoptic(args: argparse.Namespace) -> int:
    """``eval --panoptic``: COCO panoptic PQ of prediction files; --json prints one JSON object."""
    import math

    from dynaseg.evaluation.panoptic import format_panoptic_table, pq_compute

    missing = [flag for attr, flag in _PANOPTIC_FLAGS if not getattr(args, attr)]
    if missing:
        raise UserError(
            "--panoptic needs --gt-json, --gt-dir, --pred-json and --pred-dir "
            f"(missing {', '.join(missing)})"
        )
    metrics = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
    if args.json:

        def finite(v):  # strict JSON: undefined numbers (no gt, no prediction) become null
            if isinstance(v, dict):
                return {k: finite(x) for k, x in v.items()}
            return None if isinstance(v, float) and math.isnan(v) else v

        print(json.dumps(finite(metrics), allow_nan=False))
    else:
        print(format_panoptic_table(metrics))
    return 0


def _cityscapes_metrics(gt_json: str, results_json: str, iou_types: list[str]) -> dict:
    """``{"cityscapes": official AP / AP50}`` when the ground truth comes from
    ``dynaseg data cityscapes`` and masks are evaluated; else {}."""
    from dynaseg.evaluation.cityscapes import evaluate_cityscapes, is_cityscapes
    from dynaseg.evaluation.inputs import load_json

    if "segm" not in iou_types:
        return {}
    gt = load_json(gt_json, "ground-truth file")
    return {"cityscapes": evaluate_cityscapes(gt, results_json)} if is_cityscapes(gt) else {}


def _cmd_eval(args: argparse.Namespace) -> int:
    from dynaseg.evaluation.coco import evaluate_coco, format_metrics_table, format_per_class_table

    instance_only = [
        flag
        for flag, given in (
            ("--class-report", args.class_report),
            ("--drawn-at", args.drawn_at is not None),
            ("--class-agnostic", args.class_agnostic),
        )
        if given
    ]
    if args.panoptic:
        if instance_only:
            raise UserError(
                f"{instance_only[0]} reports on instance detections; it does not go with --panoptic"
            )
        return _cmd_eval_panoptic(args)
    if args.drawn_at is not None and not 0 <= args.drawn_at <= 1:
        raise UserError(f"--drawn-at must be a score in [0, 1], got {args.drawn_at}")
    used = [flag for attr, flag in _PANOPTIC_FLAGS if getattr(args, attr)]
    if used:
        raise UserError(f"{', '.join(used)} go with --panoptic")
    if args.gt or args.results:
        if not (args.gt and args.results):
            raise UserError("--gt and --results go together")
        if args.drawn_at is not None:
            if len(instance_only) > 1:
                other = next(flag for flag in instance_only if flag != "--drawn-at")
                raise UserError(f"with --gt/--results, --drawn-at and {other} are two runs")
            return _print_drawn(args.gt, args.results, args.drawn_at, as_json=args.json)
        metrics = evaluate_coco(
            args.gt, args.results, tuple(args.iou_types), class_agnostic=args.class_agnostic
        )
        gt_json, results_json = args.gt, args.results
        if not args.class_agnostic:
            metrics |= _cityscapes_metrics(gt_json, results_json, args.iou_types)
    else:
        if not (args.config and args.weights):
            raise UserError(
                "give --config and --weights (evaluate a model) or --gt and --results (evaluate a file)"
            )
        from dynaseg.config.presets import load_config
        from dynaseg.engine.distributed import cleanup
        from dynaseg.engine.evaluate import evaluate_model
        from dynaseg.inference.predictor import Predictor

        cfg = load_config(args.config, args.overrides)
        predictor = Predictor(cfg, args.weights)
        out = Path(args.output or cfg.output_dir)
        try:
            metrics = evaluate_model(predictor.cfg, predictor.model, predictor.device, out)
        finally:
            cleanup()
        gt_json, results_json = cfg.data.val_json, out / "results_val.json"
        if not metrics:
            return 0
        if "mask_resolution" in metrics and not args.json:
            from dynaseg.evaluation.resolutions import format_resolution_table

            print(format_resolution_table(metrics["mask_resolution"]))
        panoptic = metrics.get("panoptic")
        if panoptic is not None and not args.json:
            from dynaseg.evaluation.panoptic import format_panoptic_table

            print(format_panoptic_table(panoptic))
        metrics = {t: metrics[t] for t in [*args.iou_types, "cityscapes"] if t in metrics}
        if args.class_agnostic:  # the file the model just wrote, evaluated with classes ignored
            iou_types = [t for t in args.iou_types if t in metrics]
            metrics = evaluate_coco(gt_json, results_json, iou_types, class_agnostic=True)
        if panoptic is not None:
            metrics["panoptic"] = panoptic
        if not args.json:
            print(f"wrote {out / 'results_val.json'} and {out / 'metrics.json'}", file=sys.stderr)
    report = None
    if args.class_report:
        from dynaseg.evaluation.class_report import class_report

        report = class_report(
            json.loads(Path(gt_json).read_text()), json.loads(Path(results_json).read_text())
        )
    drawn = None
    if args.drawn_at is not None:
        from dynaseg.evaluation.drawn import drawn_agreement

        drawn = drawn_agreement(gt_json, results_json, score_threshold=args.drawn_at)
    if args.json:
        out_json = {t: {k: v for k, v in m.items() if k != "per_class"} for t, m in metrics.items()}
        out_json |= {"class_report": report} if report else {}
        print(json.dumps(out_json | ({"drawn": drawn} if drawn else {})))
    else:
        cityscapes = metrics.get("cityscapes")
        metrics = {t: m for t, m in metrics.items() if t not in ("panoptic", "cityscapes")}
        if args.class_agnostic:
            print("classes ignored: a detection may match an object of any class")
        print(format_metrics_table(metrics))
        if cityscapes is not None:
            print(
                f"Cityscapes instance AP {cityscapes['AP']:.1f}, AP50 {cityscapes['AP50']:.1f} "
                "(the official benchmark's metric)"
            )
        groups = None
        if any("APr" in m for m in metrics.values()):  # LVIS: per-class tables by frequency
            from dynaseg.evaluation.lvis import frequency_titles

            groups = frequency_titles(json.loads(Path(gt_json).read_text()))
        for iou_type in [] if args.class_agnostic else metrics:  # agnostic: no classes
            print(format_per_class_table(metrics, iou_type, groups=groups))
        if report:
            from dynaseg.evaluation.class_report import format_class_report

            print(format_class_report(report))
        if drawn:
            from dynaseg.evaluation.drawn import format_drawn_agreement

            print(format_drawn_agreement(drawn))
    return 0


def _print_drawn(gt_json: str, results_json: str, score_threshold: float, *, as_json: bool) -> int:
    """``eval --gt --results --drawn-at``: only the drawn-instance check (see evaluation/drawn.py)."""
    from dynaseg.evaluation.drawn import drawn_agreement, format_drawn_agreement

    drawn = drawn_agreement(gt_json, results_json, score_threshold=score_threshold)
    print(json.dumps({"drawn": drawn}) if as_json else format_drawn_agreement(drawn))
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the top-level subparsers."""
    p = sub.add_parser(
        "eval",
        help="COCO box/mask AP of a model, or of an existing results file (LVIS files: "
        "federated AP with APr/APc/APf) "
        "(--panoptic: PQ of COCO panoptic prediction files)",
    )
    _add_config(p, required=False)
    p.add_argument("--weights", help="model weights (.safetensors)")
    p.add_argument(
        "--output", help="folder for results_val.json and metrics.json (default: output_dir)"
    )
    p.add_argument("--gt", help="COCO ground-truth JSON (file mode)")
    p.add_argument("--results", help="COCO results JSON (file mode)")
    p.add_argument(
        "--iou-types",
        nargs="+",
        default=["bbox", "segm"],
        choices=["bbox", "segm", "boundary"],
        help="boundary: Boundary AP (Cheng et al. 2021; with a model it is computed by default)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    p.add_argument(
        "--class-report",
        action="store_true",
        help="also report, per object size, whether each found object's best detection has the right "
        "class, and the other-class duplicates (JSON key 'class_report')",
    )
    p.add_argument(
        "--class-agnostic",
        action="store_true",
        help="AP with the categories ignored (COCOeval's useCats=0): a detection may match an "
        "object of any class, so the drop to the usual AP is what classification costs "
        "(same JSON keys; no per-class tables; not for LVIS)",
    )
    p.add_argument(
        "--drawn-at",
        type=float,
        metavar="SCORE",
        help="report what an overlay drawn at this score threshold shows: the share of drawn instances "
        "that match an object of their class (mask IoU >= 0.5) and of objects found, and why the "
        "others are not (another class drawn on them, their class below the threshold, neither; "
        "JSON key 'drawn'); with --gt/--results only this is reported, and entries with a "
        "file_name (predict's results.json) are matched to the ground-truth image of that name",
    )
    p.add_argument(
        "--panoptic",
        action="store_true",
        help="COCO panoptic PQ of prediction files (with --gt-json, --gt-dir, --pred-json, --pred-dir)",
    )
    p.add_argument("--gt-json", help="COCO panoptic ground-truth JSON (--panoptic)")
    p.add_argument("--gt-dir", help="folder of the ground-truth panoptic PNGs (--panoptic)")
    p.add_argument("--pred-json", help="COCO panoptic predictions JSON (--panoptic)")
    p.add_argument("--pred-dir", help="folder of the predicted panoptic PNGs (--panoptic)")
    p.set_defaults(func=_cmd_eval)
