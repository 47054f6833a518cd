"""Command line: ``dynaseg {train,eval,predict,data,config} ...`` (also ``python -m dynaseg``).

Every subcommand is a thin wrapper over an importable function; ``key=value`` arguments override
config fields (``dynaseg config --config NAME`` prints them all).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dynaseg.errors import USER_ERRORS, UserError
from dynaseg.inference import DRAW_SCORE_THRESHOLD

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
    from dynaseg.utils.files import check_output_folder

    out = check_output_folder(cfg.output_dir, option="output_dir")
    out.mkdir(parents=True, exist_ok=True)
    log = _file_handler(out / "log.txt")
    logging.getLogger().addHandler(log)
    try:
        result = train(cfg, resume=resume, model=model)
    finally:
        cleanup()
        logging.getLogger().removeHandler(log)
        log.close()
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


def _cmd_predict(args: argparse.Namespace) -> int:
    from dynaseg.config.presets import load_config
    from dynaseg.inference.predict_folder import (
        check_output_for_images,
        image_files,
        predict_folder,
    )
    from dynaseg.inference.predictor import Predictor

    files = image_files(Path(args.input))  # input and output checked before loading a model
    out = check_output_for_images(args.output, files)
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
    num_results, panoptic = predict_folder(
        predictor, files, out, score_threshold=args.score_threshold, color_by=args.color_by
    )
    print(f"wrote {len(files)} overlays and {out / 'results.json'} ({num_results} instances)")
    if panoptic:
        print(f"wrote {out / 'panoptic.json'} and its PNGs in {out / 'panoptic'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """``export --format onnx``: the model with decoding, NMS and mask prediction (see docs/export.md)."""
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


def _cmd_cityscapes(args: argparse.Namespace) -> int:
    from dynaseg.data.cityscapes import convert_cityscapes

    paths = convert_cityscapes(
        args.root, args.out, num_workers=args.workers, progress=sys.stderr.isatty()
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


def _file_handler(path: Path) -> logging.Handler:
    try:
        handler = logging.FileHandler(path)
    except OSError as e:  # e.g. a folder named log.txt
        raise UserError(f"{path}: cannot write the log: {e.strerror}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    return handler


def build_parser() -> argparse.ArgumentParser:
    from dynaseg.bench.commands import add_bench_parser
    from dynaseg.convert.commands import add_convert_parser
    from dynaseg.evaluation.commands import add_eval_parser
    from dynaseg.serve.commands import add_serve_parser

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

    add_eval_parser(sub)

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
    p.add_argument(
        "--output",
        required=True,
        help="output folder (not the images' own): one overlay NAME.png per image NAME.EXT; "
        "images sharing a NAME (a.png, a.jpg) get a.png.png, a.jpg.png",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=DRAW_SCORE_THRESHOLD,
        help=f"keep instances scoring at least this (default {DRAW_SCORE_THRESHOLD})",
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

    add_convert_parser(sub)

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
    s = data_sub.add_parser(
        "cityscapes",
        help="convert Cityscapes gtFine instances to COCO JSON (train, val; see docs/datasets.md)",
    )
    s.add_argument("--root", required=True, help="Cityscapes folder with gtFine/ and leftImg8bit/")
    s.add_argument("--out", required=True, help="writes OUT/annotations/instances_<split>.json")
    s.add_argument("--workers", type=int, default=4, help="processes (0: this one)")
    s.set_defaults(func=_cmd_cityscapes)

    add_bench_parser(sub)

    add_serve_parser(sub)

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
