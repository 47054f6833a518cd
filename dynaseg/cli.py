"""Command line: ``dynaseg {train,eval,predict,data,config} ...`` (also ``python -m dynaseg``).

Every subcommand is a thin wrapper over an importable function; ``key=value`` arguments override
config fields (``dynaseg config --config NAME`` prints them all).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dynaseg.errors import USER_ERRORS, UserError

if TYPE_CHECKING:
    from torch import nn

    from dynaseg.config.schema import ExperimentConfig

__all__ = ["main"]

logger = logging.getLogger("dynaseg")


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="preset name or YAML file")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. solver.max_iter=1000",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from dynaseg.config.presets import load_config

    return _run_training(load_config(args.config, args.overrides), resume=args.resume)


def _run_training(cfg: ExperimentConfig, *, resume: bool, model: nn.Module | None = None) -> int:
    """Train (``model`` replaces the one ``cfg`` describes), then print the metrics and the run folder."""
    from dynaseg.engine.distributed import cleanup
    from dynaseg.engine.trainer import train
    from dynaseg.evaluation.coco import format_metrics_table
    from dynaseg.utils.comm import is_main_process

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    logging.getLogger().addHandler(_file_handler(Path(cfg.output_dir) / "log.txt"))
    try:
        result = train(cfg, resume=resume, model=model)
    finally:
        cleanup()
    if is_main_process():
        if result.metrics:
            print(format_metrics_table(result.metrics))
            if "panoptic" in result.metrics:
                from dynaseg.evaluation.panoptic import format_panoptic_table

                print(format_panoptic_table(result.metrics["panoptic"]))
            if "mask_resolution" in result.metrics:
                from dynaseg.evaluation.resolutions import format_resolution_table

                print(format_resolution_table(result.metrics["mask_resolution"]))
        print(f"run folder: {result.output_dir}\nweights: {result.weights}")
    return 0


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


def _cmd_eval(args: argparse.Namespace) -> int:
    from dynaseg.evaluation.coco import evaluate_coco, format_metrics_table, format_per_class_table

    if args.panoptic:
        if args.class_report:
            raise UserError(
                "--class-report reports on instance detections; it does not go with --panoptic"
            )
        return _cmd_eval_panoptic(args)
    used = [flag for attr, flag in _PANOPTIC_FLAGS if getattr(args, attr)]
    if used:
        raise UserError(f"{', '.join(used)} go with --panoptic")
    if args.gt or args.results:
        if not (args.gt and args.results):
            raise UserError("--gt and --results go together")
        metrics = evaluate_coco(args.gt, args.results, tuple(args.iou_types))
        gt_json, results_json = args.gt, args.results
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
        metrics = {t: metrics[t] for t in args.iou_types if t in metrics}
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
    if args.json:
        out_json = {t: {k: v for k, v in m.items() if k != "per_class"} for t, m in metrics.items()}
        print(json.dumps(out_json | ({"class_report": report} if report else {})))
    else:
        metrics = {t: m for t, m in metrics.items() if t != "panoptic"}
        print(format_metrics_table(metrics))
        for iou_type in metrics:
            print(format_per_class_table(metrics, iou_type))
        if report:
            from dynaseg.evaluation.class_report import format_class_report

            print(format_class_report(report))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import itertools

    from dynaseg.config.presets import load_config
    from dynaseg.data.image_io import read_image
    from dynaseg.inference.predictor import Predictor
    from dynaseg.inference.visualize import save_overlay, save_panoptic_overlay
    from dynaseg.structures.panoptic import PanopticSegmentation

    if args.onnx:
        if args.weights:
            raise UserError("give --weights (eager model) or --onnx (exported model), not both")
        from dynaseg.export.onnx_runtime import OnnxPredictor

        predictor = OnnxPredictor(args.onnx, args.config, args.overrides)
    else:
        if not (args.config and args.weights):
            raise UserError(
                "predict needs --config and --weights (or --onnx MODEL.onnx, config optional)"
            )
        predictor = Predictor(load_config(args.config, args.overrides), args.weights)
    if predictor.is_panoptic and args.color_by == "resolution":
        raise UserError(
            "--color-by resolution needs a two-stage instance model, not a panoptic one"
        )
    source = Path(args.input)
    if source.is_dir():
        files = sorted(
            p
            for p in source.iterdir()
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
        )
    elif source.is_file():
        files = [source]
    else:
        raise UserError(f"{source}: no such file or folder")
    if not files:
        raise UserError(f"{source}: no images found")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from dynaseg.evaluation.coco import CategoryMap, instances_to_coco_results
    from dynaseg.evaluation.panoptic_io import panoptic_to_coco, write_panoptic_predictions

    category_map = CategoryMap(category_ids=predictor.category_ids, names=predictor.class_names)
    # Stuff categories: from the weights' metadata, else numbered on from the thing ids.
    num_stuff = max(
        len(predictor.stuff_category_ids),
        len(predictor.stuff_names),
        getattr(predictor.cfg.model, "num_stuff_classes", 0),
    )
    first_stuff_id = max(predictor.category_ids, default=0) + 1
    stuff_ids = predictor.stuff_category_ids or list(
        range(first_stuff_id, first_stuff_id + num_stuff)
    )
    stuff_names = predictor.stuff_names or [f"stuff_{i}" for i in range(num_stuff)]
    categories = [
        {"id": c, "name": n, "isthing": 1}
        for c, n in zip(predictor.category_ids, predictor.class_names)
    ] + [{"id": c, "name": n, "isthing": 0} for c, n in zip(stuff_ids, stuff_names)]
    results = []
    from tqdm import tqdm

    def predict_all():
        """Segment every image: overlays written, thing detections into ``results``; yields the
        (annotation, png) of each panoptic prediction (the panoptic map is final: no threshold)."""
        for image_id, path in enumerate(tqdm(files, desc="predict", mininterval=5), start=1):
            image = read_image(path)
            prediction = predictor(image)
            panoptic = isinstance(prediction, PanopticSegmentation)
            instances = prediction.instances if panoptic else prediction
            if instances is not None:
                instances = instances[instances.scores >= args.score_threshold]
                for r in instances_to_coco_results(instances, image_id, category_map):
                    results.append({**r, "file_name": path.name})
            if panoptic:
                png, ann = panoptic_to_coco(
                    prediction,
                    image_id=image_id,
                    file_name=path.name,
                    thing_category_ids=predictor.category_ids,
                    stuff_category_ids=stuff_ids,
                )
                yield ann, png
                save_panoptic_overlay(
                    out / f"{path.stem}.png",
                    image,
                    prediction,
                    thing_names=predictor.class_names,
                    stuff_names=stuff_names,
                )
            else:
                style = resolution_style(instances, path) if args.color_by == "resolution" else {}
                save_overlay(
                    out / f"{path.stem}.png", image, instances, predictor.class_names, **style
                )

    # Instance models run to the end in next(); panoptic ones stream their PNGs to disk.
    steps = predict_all()
    first = next(steps, None)
    if first is not None:
        write_panoptic_predictions(
            itertools.chain([first], steps),
            json_path=out / "panoptic.json",
            png_dir=out / "panoptic",
            categories=categories,
        )
    (out / "results.json").write_text(json.dumps(results))
    print(f"wrote {len(files)} overlays and {out / 'results.json'} ({len(results)} instances)")
    if first is not None:
        print(f"wrote {out / 'panoptic.json'} and its PNGs in {out / 'panoptic'}")
    return 0


# The DynaMask paper's Fig. 7 colours: red 112, blue 56, green 28, yellow 14.
RESOLUTION_COLORS = {112: (230, 30, 30), 56: (40, 90, 240), 28: (30, 190, 60), 14: (245, 210, 20)}


def resolution_style(instances, path: Path) -> dict:
    """Overlay colours by each instance's chosen mask resolution, with a legend."""
    sides = getattr(instances, "mask_resolutions", None)
    if sides is None:
        raise UserError(
            f"{path}: --color-by resolution needs a two-stage model (mask_rcnn / dynamask)"
        )
    colors = [RESOLUTION_COLORS.get(int(s), (128, 128, 128)) for s in sides.tolist()]
    legend = {f"{side}×{side}": color for side, color in RESOLUTION_COLORS.items()}
    return {"colors": colors, "legend": legend}


def _cmd_export(args: argparse.Namespace) -> int:
    """``export --format onnx``: the model with decoding, NMS and mask prediction (see dynaseg/export/onnx.py)."""
    from dynaseg.config.presets import load_config
    from dynaseg.export.onnx import ExportError, export_onnx

    cfg = load_config(args.config, args.overrides)
    try:
        path = export_onnx(cfg, args.weights, args.output, opset=args.opset)
    except (ExportError, ImportError) as e:
        raise UserError(
            f"{e} (ONNX export needs the 'export' extra: pip install 'dynaseg[export]')"
            if isinstance(e, ImportError)
            else str(e)
        ) from None
    print(
        f"wrote {path} ({cfg.model.kind}, opset {args.opset}); run it with: dynaseg predict --onnx {path} "
        "--input IMAGES --output FOLDER"
    )
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from dynaseg.data.synthetic import generate_synthetic

    paths = generate_synthetic(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed,
        max_objects=args.max_objects,
        progress=True,
    )
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from dynaseg.config.overrides import to_dict
    from dynaseg.config.presets import PRESETS, load_config

    if not args.config:
        print("\n".join(PRESETS))
        return 0
    print(
        yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end=""
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: HTTP inference service (FastAPI + uvicorn); see docs/serve.md."""
    try:
        import uvicorn

        from dynaseg.serve import ServeLimits, create_app
    except ImportError as e:
        raise UserError(
            f"{e} (dynaseg serve needs the 'serve' extra: pip install 'dynaseg[serve]')"
        ) from None
    from dynaseg.config.presets import load_config
    from dynaseg.inference.predictor import Predictor

    try:
        limits = ServeLimits(
            max_bytes=args.max_bytes,
            max_pixels=args.max_pixels,
            max_concurrency=args.max_concurrency,
            queue_size=args.queue_size,
            read_timeout_s=args.read_timeout,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UserError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    predictor = Predictor(
        load_config(args.config, args.overrides), args.weights, device=args.device
    )
    app = create_app(predictor, limits=limits, score_threshold=args.score_threshold)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
    return 0


def _file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    return handler


def build_parser() -> argparse.ArgumentParser:
    from dynaseg.bench.commands import add_bench_parser

    parser = argparse.ArgumentParser(prog="dynaseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train a model (torchrun --nproc-per-node N -m dynaseg train ... for DDP)"
    )
    _add_config(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="COCO box/mask AP of a model, or of an existing results file "
        "(--panoptic: PQ of COCO panoptic prediction files)",
    )
    _add_config(p, required=False)
    p.add_argument("--weights", help="model weights (.safetensors)")
    p.add_argument(
        "--output", help="folder for results_val.json and metrics.json (default: output_dir)"
    )
    p.add_argument("--gt", help="COCO ground-truth JSON (file mode)")
    p.add_argument("--results", help="COCO results JSON (file mode)")
    p.add_argument("--iou-types", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    p.add_argument(
        "--class-report",
        action="store_true",
        help="also report, per object size, whether each found object's best detection has the right "
        "class, and the other-class duplicates (JSON key 'class_report')",
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

    p = sub.add_parser(
        "predict",
        help="segment images: overlay PNGs and COCO results JSON "
        "(panoptic models: also COCO panoptic PNGs and panoptic.json)",
    )
    _add_config(p, required=False)
    p.add_argument("--weights", help="model weights (.safetensors); or --onnx")
    p.add_argument(
        "--onnx",
        help="run a model exported by `dynaseg export --format onnx` in onnxruntime "
        "instead (--config optional: the file holds its config)",
    )
    p.add_argument("--input", required=True, help="an image or a folder of images")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--score-threshold", type=float, default=0.3, help="keep instances scoring at least this"
    )
    p.add_argument(
        "--color-by",
        choices=["instance", "resolution"],
        default="instance",
        help="overlay colours: one per instance, or by chosen mask resolution (DynaMask Fig. 7)",
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export", help="export a model with its decoding, NMS and mask prediction (ONNX)"
    )
    _add_config(p)
    p.add_argument("--weights", required=True, help="model weights (.safetensors)")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--output", required=True, help="output file, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (16-20)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write the built-in synthetic COCO dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--num-train", type=int, default=200)
    s.add_argument("--num-val", type=int, default=50)
    s.add_argument("--image-size", type=int, default=320)
    s.add_argument("--max-objects", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    add_bench_parser(sub)

    p = sub.add_parser(
        "serve",
        help="HTTP inference service: POST /predict, GET /health, GET /model "
        "(needs the 'serve' extra; see docs/serve.md)",
    )
    _add_config(p)
    p.add_argument("--weights", required=True, help="model weights (.safetensors)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=0.3,
        help="default of /predict's score_threshold query parameter",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=16 * 2**20,
        help="largest request body in bytes (413 beyond)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=25_000_000,
        help="largest image width*height, checked from its header before decoding (413 beyond)",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=1, help="images decoded and segmented at once"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=16,
        help="further requests admitted to wait; beyond them 503 with Retry-After",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        help="seconds a request has to send its body (408 beyond)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "config", help="print a preset's resolved config (no --config: list presets)"
    )
    _add_config(p, required=False)
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"dynaseg: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
