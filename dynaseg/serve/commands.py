"""``dynaseg serve``: the HTTP inference service's command line (the app is in ``serve/app.py``)."""

from __future__ import annotations

import argparse
import re

from dynaseg.cli import _add_config
from dynaseg.errors import UserError
from dynaseg.inference import DRAW_SCORE_THRESHOLD

__all__ = ["add_serve_parser", "check_device", "check_port"]


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0: any free port), got {port}")


def check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that this machine has; :class:`UserError` else."""
    import torch

    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device in ("auto", "cpu"):
        return
    if match is None:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    index, count = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise UserError(
            f"--device {device}: this machine has {count} CUDA device(s), 0..{count - 1}"
        )


def _limits(args: argparse.Namespace):
    from dynaseg.serve import ServeLimits

    try:
        return ServeLimits(
            max_bytes=args.max_bytes,
            max_pixels=args.max_pixels,
            max_concurrency=args.max_concurrency,
            queue_size=args.queue_size,
            read_timeout_s=args.read_timeout,
            min_upload_rate=args.min_upload_rate,
            upload_grace_s=args.upload_grace,
            max_connections=args.max_connections,
            header_timeout_s=args.header_timeout,
            keep_alive_s=args.keep_alive,
            send_timeout_s=args.send_timeout,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    """``serve``: HTTP inference service (FastAPI + uvicorn); see docs/serve.md."""
    try:
        from dynaseg.serve import create_app
        from dynaseg.serve.memory import return_large_blocks
        from dynaseg.serve.server import fit_connections_to_fd_limit, listen, make_server
    except ImportError as e:
        raise UserError(
            f"{e} (dynaseg serve needs the 'serve' extra: pip install 'dynaseg[serve]')"
        ) from None
    from dynaseg.config.presets import load_config
    from dynaseg.inference.predictor import Predictor

    limits = _limits(args)
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UserError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    check_port(args.port)
    check_device(args.device)
    limits = fit_connections_to_fd_limit(limits)
    return_large_blocks()
    listener = listen(args.host, args.port)  # a port in use is an error before the model loads
    try:
        predictor = Predictor(
            load_config(args.config, args.overrides), args.weights, device=args.device
        )
        app = create_app(predictor, limits=limits, score_threshold=args.score_threshold)
        server = make_server(app, limits=limits, listener=listener, log_level=args.log_level)
        host, port = server.address
        print(f"dynaseg serve: http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
        server.run()
    finally:
        listener.close()
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the top-level subparsers."""
    p = sub.add_parser(
        "serve",
        help="HTTP inference service: POST /predict, GET /health, GET /model, a page at / "
        "(needs the 'serve' extra; see docs/serve.md)",
    )
    _add_config(p)
    p.add_argument("--weights", required=True, help="model weights (.safetensors)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--score-threshold",
        type=float,
        default=DRAW_SCORE_THRESHOLD,
        help=f"default of /predict's score_threshold query parameter ({DRAW_SCORE_THRESHOLD})",
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
        help="further requests admitted to wait or to send their reply; beyond them 503 "
        "with Retry-After",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        help="seconds a request has to send its whole body (408 beyond)",
    )
    p.add_argument(
        "--min-upload-rate",
        type=int,
        default=16_384,
        help="bytes/s a body must average after --upload-grace (408 as soon as it falls behind)",
    )
    p.add_argument(
        "--upload-grace",
        type=float,
        default=5.0,
        help="seconds a body may take before --min-upload-rate applies",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections; at the cap a new one replaces the oldest idle one "
        "(lowered to fit ulimit -n)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection has to send a complete request head",
    )
    p.add_argument(
        "--keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        default=30.0,
        help="seconds a client may take none of its reply before it is disconnected",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=_cmd_serve)
