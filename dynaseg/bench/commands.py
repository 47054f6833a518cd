"""``dynaseg bench ...``: the benchmark subcommands (speed, FLOPs, mask head, training, FCOS peer, budget).

Thin wrappers over ``dynaseg.bench``; registered on the main parser by :func:`add_bench_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys

from dynaseg.cli import _add_config, _run_training
from dynaseg.errors import UserError

__all__ = ["add_bench_parser"]


def _bench_model(args: argparse.Namespace):

    from dynaseg.config.presets import load_config
    from dynaseg.config.schema import RCNNConfig
    from dynaseg.modeling.build import build_model

    cfg = load_config(args.config, args.overrides)
    if not isinstance(cfg.model, RCNNConfig):
        raise UserError(
            f"bench {args.bench_command} measures two-stage mask heads; '{args.config}' is {cfg.model.kind}"
        )
    return cfg.model, build_model(cfg.model, pretrained=False)


def _cmd_bench_flops(args: argparse.Namespace) -> int:
    """``bench flops``: GMAC per model and stage; a two-stage first config adds its mask head per
    resolution beside the paper's Table 7 (the JSON keeps those keys at the top level)."""
    import dataclasses

    from dynaseg.bench.flops import format_flops_table, run_flops_benchmark
    from dynaseg.bench.mask_head import mask_head_flops
    from dynaseg.bench.speed import parse_size
    from dynaseg.config.presets import load_config
    from dynaseg.config.schema import RCNNConfig
    from dynaseg.modeling.build import build_model

    try:
        size = parse_size(args.size)
    except ValueError as e:
        raise UserError(str(e)) from None
    rows, notes = run_flops_benchmark(
        args.configs,
        overrides=args.overrides,
        peer=None if args.peer == "none" else args.peer,
        image_size=size,
        detections=args.detections,
    )
    first = load_config(args.configs[0].split()[0], [*args.overrides, *args.configs[0].split()[1:]])
    result: dict = {}
    if isinstance(first.model, RCNNConfig):
        model_cfg = first.model
        reference = build_model(dataclasses.replace(model_cfg, kind="mask_rcnn"), pretrained=False)
        model = build_model(model_cfg, pretrained=False)
        result = {"model": model_cfg.kind, **mask_head_flops(model, reference)}
    if args.json:
        print(json.dumps(result | {"models": rows}))
        print("\n".join(notes), file=sys.stderr)
        return 0
    print(format_flops_table(rows, notes))
    if result:
        ours, paper = result["mask_head_gmac_per_instance"], result["paper_table7_gflops"]
        print(f"\nmask head of {args.configs[0]} per instance:")
        print(f"{'mask side':>10} {'ours (GMAC)':>12} {'paper Table 7 (G)':>18}")
        for side, g in ours.items():
            print(f"{side + '²':>10} {g:12.3f} {paper.get(side, float('nan')):18.2f}")
        print(f"per-instance overhead (MSM): {result['per_instance_overhead_gmac']:.3f} GMAC")
        print(
            f"Mask R-CNN 28×28 head: ours {result['mask_rcnn_28_gmac_per_instance']:.3f} GMAC, "
            f"paper {result['paper_mask_rcnn_gflops']} G"
        )
    return 0


def _cmd_bench_maskhead(args: argparse.Namespace) -> int:
    from dynaseg.bench.mask_head import time_mask_head

    _, model = _bench_model(args)
    mix = [float(x) for x in args.mix.split(",")] if args.mix else None
    if mix is not None and (len(mix) != 4 or abs(sum(mix) - 1) > 1e-6 or min(mix) < 0):
        raise UserError(
            f"--mix needs four non-negative fractions for 14,28,56,112 summing to 1, got {args.mix}"
        )
    h, w = (int(v) for v in args.size.lower().split("x"))
    result = time_mask_head(
        model,
        policy=args.policy,
        num_instances=args.instances,
        image_size=(h, w),
        mix=mix,
        repeats=args.repeats,
    )
    if args.json:
        print(json.dumps({k: result[k] for k in ("ms_per_instance", "gmac_per_instance")} | result))
    else:
        print(
            f"policy {result['policy']}: {result['ms_per_instance']:.3f} ms and "
            f"{result['gmac_per_instance']:.3f} GMAC per instance; resolutions {result['resolution_counts']}"
        )
    return 0


def _bench_size_and_device(args: argparse.Namespace):
    """``--size HxW`` and ``--device`` of a bench command, as a user error when malformed."""
    from dynaseg.bench.speed import check_device, parse_size

    try:
        return parse_size(args.size), check_device(args.device)
    except ValueError as e:
        raise UserError(str(e)) from None


def _cmd_bench_speed(args: argparse.Namespace) -> int:
    """``bench speed``: end-to-end inference ms of configs and a torchvision peer; --json prints a list."""
    from dynaseg.bench.report import parse_ap_values, write_speed_report
    from dynaseg.bench.speed import format_speed_table, run_speed_benchmark, unique_names

    size, device = _bench_size_and_device(args)
    peer = None if args.peer == "none" else args.peer
    try:
        ap = parse_ap_values(
            args.ap or [], models=[*unique_names(args.configs), *([peer] if peer else [])]
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if ap and not args.output:
        raise UserError("--ap draws the AP-vs-latency plot into --output DIR; give --output too")
    rows, notes = run_speed_benchmark(
        args.configs,
        overrides=args.overrides,
        peer=peer,
        image_size=size,
        detections=args.detections,
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    table = format_speed_table(rows, notes)
    if args.json:
        keys = ("model", "median_ms", "p90_ms", "ratio_to_peer", "detections", "stages_ms")
        print(json.dumps([{k: r[k] for k in keys} | r for r in rows]))
        print("\n".join(notes), file=sys.stderr)
    else:
        print(table)
    if args.output:
        for path in write_speed_report(rows, notes, table, args.output, ap=ap):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_bench_train(args: argparse.Namespace) -> int:
    """``bench train``: training images/s of configs and torchvision's Mask R-CNN; --json prints a list."""
    from dynaseg.bench.train_speed import format_train_table, run_train_benchmark

    size, device = _bench_size_and_device(args)
    rows, notes = run_train_benchmark(
        args.configs,
        overrides=args.overrides,
        peer=None if args.peer == "none" else args.peer,
        image_size=size,
        batch_size=args.batch,
        iters=args.iters,
        warmup=args.warmup,
        device=device,
    )
    if args.json:
        print(
            json.dumps(
                [{k: r[k] for k in ("model", "images_per_s", "ms_per_iter")} | r for r in rows]
            )
        )
        print("\n".join(notes), file=sys.stderr)
    else:
        print(format_train_table(rows, notes))
    return 0


def _cmd_bench_fcos_peer(args: argparse.Namespace) -> int:
    """``bench fcos-peer``: train torchvision's FCOS with a one-stage config's backbone, data and schedule."""
    from dynaseg.bench.fcos_peer import build_torchvision_fcos
    from dynaseg.config.presets import load_config
    from dynaseg.config.schema import BlendMaskConfig, DR1MaskConfig, num_stuff_classes

    cfg = load_config(args.config, args.overrides)
    if not isinstance(cfg.model, (BlendMaskConfig, DR1MaskConfig)) or num_stuff_classes(cfg.model):
        raise UserError(
            f"bench fcos-peer takes an instance-segmentation FCOS config (BlendMask or DR1Mask); "
            f"'{args.config}' is {cfg.model.kind}"
        )
    return _run_training(cfg, resume=args.resume, model=build_torchvision_fcos(cfg.model))


def _cmd_bench_budget(args: argparse.Namespace) -> int:
    """``bench budget``: DynaMask's Table 5 (one model per C_t, λ2 row, phase 1 shared) under output_dir."""
    from pathlib import Path

    from dynaseg.bench.budget_sweep import format_budget_table, parse_rows, run_budget_sweep
    from dynaseg.config.presets import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.model.kind != "dynamask":
        raise UserError(f"bench budget trains DynaMask rows; '{args.config}' is {cfg.model.kind}")
    try:
        rows = parse_rows(args.rows)
    except ValueError as e:
        raise UserError(str(e)) from None
    table = run_budget_sweep(cfg, rows, Path(cfg.output_dir))
    print(json.dumps(table) if args.json else format_budget_table(table))
    return 0


def _cmd_bench_data(args: argparse.Namespace) -> int:
    """``bench data``: see :mod:`dynaseg.bench.data_memory`."""
    from dynaseg.bench.data_memory import format_data_report, run_data_benchmark

    size = None
    if args.size:
        try:
            size = tuple(int(v) for v in args.size.lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise UserError(f"--size must be IMAGESxINSTANCES (e.g. 2000x15000), got {args.size!r}")
    if args.workers < 1 or args.detections < 1 or args.eval_images < 0:
        raise UserError("--workers and --detections must be >= 1, --eval-images >= 0")
    report = run_data_benchmark(
        args.out,
        lvis=args.lvis,
        layouts=tuple(args.layouts),
        num_workers=args.workers,
        eval_images=args.eval_images,
        per_image=args.detections,
        size=size,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps(report) if args.json else format_data_report(report))
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its subcommands to the top-level subparsers."""
    from dynaseg.config.schema import DYNAMASK_POLICIES

    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    b = bench_sub.add_parser(
        "flops",
        help="multiply-accumulates per model and stage (torch's flop counter), "
        "and a two-stage model's mask head per instance at each resolution",
    )
    b.add_argument(
        "--config",
        dest="configs",
        action="append",
        required=True,
        help="preset name or YAML file, optionally followed by its own overrides (repeat for several)",
    )
    b.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, applied to every config",
    )
    b.add_argument(
        "--peer", default="none", choices=["torchvision-maskrcnn", "torchvision-fcos", "none"]
    )
    b.add_argument("--size", default="800x1216", help="image size HxW (seeded random image)")
    b.add_argument(
        "--detections", type=int, default=100, help="instances every model is forced to output"
    )
    b.add_argument(
        "--json",
        action="store_true",
        help='print {"models": [rows], ...} (+ the first config\'s mask head per resolution when two-stage)',
    )
    b.set_defaults(func=_cmd_bench_flops)

    b = bench_sub.add_parser(
        "maskhead", help="time the mask head alone on fixed random RoI features"
    )
    _add_config(b)
    b.add_argument(
        "--policy", default="msm", choices=[p for p in DYNAMASK_POLICIES if p != "quota"]
    )
    b.add_argument(
        "--mix",
        help="force the MSM's choices to these fractions of 14,28,56,112, e.g. 0.35,0.34,0.21,0.10",
    )
    b.add_argument("--instances", type=int, default=100)
    b.add_argument("--size", default="800x1216", help="image size HxW of the random FPN features")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bench_maskhead)
    b = bench_sub.add_parser(
        "speed",
        help="end-to-end inference time per image against a torchvision peer "
        "(untrained weights, N detections forced, interleaved runs)",
    )
    b.add_argument(
        "--config",
        dest="configs",
        action="append",
        required=True,
        help="preset name or YAML file, optionally followed by its own overrides "
        '("dynamask_r50_fpn_1x model.dynamask.policy=112"); repeat for several models',
    )
    b.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, applied to every config",
    )
    b.add_argument(
        "--peer",
        default="torchvision-maskrcnn",
        choices=["torchvision-maskrcnn", "torchvision-fcos", "none"],
    )
    b.add_argument("--size", default="800x1216", help="image size HxW (seeded random image)")
    b.add_argument(
        "--detections", type=int, default=100, help="instances every model is forced to output"
    )
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument(
        "--repeats", type=int, default=10, help="timed rounds (each runs every model once)"
    )
    b.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    b.add_argument("--json", action="store_true")
    b.add_argument(
        "--output", help="also write speed.md, speed.json (and with --ap ap_vs_latency.png) here"
    )
    b.add_argument(
        "--ap",
        action="append",
        metavar="MODEL=AP",
        help="mask AP of a table row (repeat), e.g. blendmask_r50_fpn_1x=37.8: plotted against latency",
    )
    b.set_defaults(func=_cmd_bench_speed)
    b = bench_sub.add_parser(
        "train",
        help="training images/s (forward + backward + SGD step) against "
        "torchvision's Mask R-CNN on a fixed synthetic batch",
    )
    b.add_argument(
        "--config",
        dest="configs",
        action="append",
        required=True,
        help="preset name or YAML file, optionally followed by its own overrides, e.g. "
        "'blendmask_r18_synth_cpu solver.amp=true' (bf16 autocast; repeat for several models)",
    )
    b.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, applied to every config",
    )
    b.add_argument(
        "--peer", default="torchvision-maskrcnn", choices=["torchvision-maskrcnn", "none"]
    )
    b.add_argument("--size", default="512x512", help="image size HxW")
    b.add_argument("--batch", type=int, default=2, help="images per iteration")
    b.add_argument(
        "--iters", type=int, default=10, help="timed iterations (each runs every model once)"
    )
    b.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bench_train)

    b = bench_sub.add_parser(
        "fcos-peer",
        help="train torchvision's FCOS detector with a BlendMask / DR1Mask "
        "config's backbone, data, schedule and evaluation (box AP beside ours)",
    )
    _add_config(b)
    b.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    b.set_defaults(func=_cmd_bench_fcos_peer)
    b = bench_sub.add_parser(
        "budget",
        help="DynaMask's budget sweep (paper Table 5): one model per C_t:lambda2 "
        "row from a shared phase 1, each evaluated with the MSM and at 112x112",
    )
    _add_config(b)
    b.add_argument(
        "--rows",
        default="1.0:0.4,0.8:0.4,0.6:0.4,0.4:0.4,1.0:0.3,1.0:0.5",
        help="C_t:lambda2 pairs in the paper's unit (G per instance), the first trains phase 1 "
        "(default: Table 5's six rows)",
    )
    b.add_argument(
        "--json",
        action="store_true",
        help="print the rows as JSON (also in output_dir/table5.json)",
    )
    b.set_defaults(func=_cmd_bench_budget)
    b = bench_sub.add_parser(
        "data",
        help="load, sample (4 workers) and evaluate a generated dataset of COCO's size: time, "
        "and memory of the main process and of each worker (PSS / USS)",
    )
    b.add_argument(
        "--synthetic-coco-size",
        action="store_true",
        required=True,
        help="generate the annotations of a COCO-sized dataset (118 287 images, 860 001 "
        "instances; with --lvis LVIS v1's 100 170 / 1 270 141) and measure on them",
    )
    b.add_argument("--lvis", action="store_true", help="LVIS v1-style file and size")
    b.add_argument(
        "--out", default="runs/bench_data", help="folder for the generated files (reused)"
    )
    b.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    b.add_argument(
        "--layouts",
        nargs="+",
        default=["objects", "packed"],
        choices=["objects", "packed"],
        help="records as packed arrays (ours) and as a list of Python objects (before)",
    )
    b.add_argument("--eval-images", type=int, default=5000, help="0: no evaluation")
    b.add_argument("--detections", type=int, default=100, help="per evaluated image")
    b.add_argument(
        "--size",
        help="IMAGESxINSTANCES of the training file instead of COCO's (e.g. 2000x15000)",
    )
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=_cmd_bench_data)
